"""NFE-vs-quality study: solvers x schedules x NFE on one model kind over CIFAR-10 (16x16 by default).

Model kinds (``--model``):
  kde       the closed-form (KDE) denoiser of a seeded subset of the training images;
  gaussian  the Gaussian fitted to them (full covariance, or ``--rank``): the probability-flow
            ODE has a closed form, so the reference is exact (GaussianDenoiser.flow);
  mog       one low-rank Gaussian per class (LowRankMixtureDenoiser, ``--rank``, default 32);
  network   the trained network ``geosample.models.load("cifar10-tiny")``;
  flow      the ``mog`` model as a flow-matching velocity model (FlowDenoiser over its exact
            velocity), sampled from t = 1 (sigma = inf) to a final denoise: GITS against SD3's
            shifted flow schedule (``sd3``: shift 3, flow times 1 .. 1e-3), one-call solvers.

For every solver x schedule x NFE the same seeded noise is solved and compared with the reference
(exact for ``gaussian``; RK4 in log sigma, 400 steps, for ``mog``; Heun 100 steps = 199 NFE on
EDM's rho=7 schedule otherwise, for ``flow`` from sigma = inf and ending with the same final denoise).  RMSE is the root of the mean squared error over every sample and
pixel; PSNR = 20 log10(2 / RMSE) is computed from that same mean (never a mean of per-sample
PSNRs).  KID (unbiased MMD^2 of 4x4-pooled pixel features, :func:`geosample.metrics.kid`) against
``--kid-real`` data images.  GITS uses ``geosample.gits.search`` with ``--gamma`` (1.15: the
reference's; ``sweep``: picked per solver by its own error to the teacher), ``--refine`` (the path
refined by each solver's own error, ``refine=True``) and ``--num-warmup`` teacher samples.
Writes ``nfe_quality_<model>[_<tag>].json``, ``.md`` and ``.png`` to ``--out``.

    python benchmarks/nfe_quality.py --model gaussian --batch 64
    python benchmarks/nfe_quality.py --model network --batch 32 --gamma sweep --tag sweep
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tarfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

import geosample as gs
from geosample import metrics
from geosample._io import atomic_write, atomic_write_text
from geosample.solvers import steps_for_nfe
from geosample.data import load_images, resolve, subset_rows
from geosample.denoisers import GaussianDenoiser, KDEDenoiser, LowRankMixtureDenoiser
from geosample.denoisers.adapters import FlowDenoiser
from geosample.denoisers.gaussian import solve_flow
from geosample.denoisers.gaussian_flow import GaussianMixtureFlow

MODELS = ("kde", "gaussian", "mog", "network", "flow")
SOLVERS = ("euler", "ipndm", "dpmpp", "unipc", "deis", "heun")
SCHEDULES = ("polynomial", "logsnr", "gits")
FLOW_SCHEDULES = ("sd3", "gits")          # --model flow: SD3's shifted flow times, GITS after the t = 1 start
FLOW_T_MIN, FLOW_SHIFT, FLOW_SIGMA_MAX = 1e-3, 3.0, 999.0
NFES = tuple(range(3, 11))
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DATA_RANGE = 2.0  # images in [-1, 1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--data", default="cifar10", help="CIFAR-10 tar/folder laid out <class>/<file> (default cifar10)")
    p.add_argument("--resolution", type=int, default=16, choices=(8, 16, 32), help="box-downsampled side (16)")
    p.add_argument("--data-size", type=int, default=None, help="images the model is built from (default all)")
    p.add_argument("--subset", default="balanced", choices=("balanced", "random"),
                   help="how --data-size images are drawn (seeded): equal per class, or uniformly")
    p.add_argument("--rank", type=int, default=None, help="covariance rank (gaussian: default full; mog: 32)")
    p.add_argument("--batch", type=int, default=32, help="samples per configuration (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solvers", default=None, help=f"default {','.join(SOLVERS)} (flow: without heun)")
    p.add_argument("--schedules", default=None, help=f"default {','.join(SCHEDULES)} (flow: {','.join(FLOW_SCHEDULES)})")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--num-warmup", type=int, default=64, help="GITS teacher samples (default 64)")
    p.add_argument("--gamma", default="1.15", help="GITS discount: one value, a comma list or 'sweep'")
    p.add_argument("--refine", action="store_true",
                   help="GITS refine=True: the path moved by each solver's own error to the teacher "
                        "(with --gamma sweep: the recommended setting)")
    p.add_argument("--kid-real", type=int, default=1000, help="data images for KID (0: no KID)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--tag", default="", help="output names nfe_quality_<model>_<tag>.*")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def class_labels(path: Path) -> np.ndarray:
    """Class index per image, in load_images' order (sorted member names, class = parent folder)."""
    if path.is_dir():
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    else:
        with tarfile.open(path) as tar:
            names = sorted(m.name for m in tar if m.isfile())
    folders = [Path(n).parent.name for n in names]
    classes = sorted(set(folders))
    return np.array([classes.index(f) for f in folders])


def draw_subset(labels: np.ndarray, size: int | None, how: str, gen: torch.Generator, seed: int) -> torch.Tensor:
    """Indices of ``size`` images (all when None): a seeded uniform draw (geosample.data.subset_rows,
    as ``load_dataset(limit=)`` draws), or size/K per class."""
    n = len(labels)
    if size is None or size >= n:
        return torch.arange(n)
    if how == "random":
        return torch.as_tensor(subset_rows(n, size, "random", seed))
    classes = np.unique(labels)
    if size % len(classes):
        raise ValueError(f"--data-size {size} must be a multiple of the {len(classes)} classes for a balanced subset")
    per = size // len(classes)
    picks = [torch.from_numpy(np.flatnonzero(labels == c))[torch.randperm(int((labels == c).sum()), generator=gen)[:per]]
             for c in classes]
    return torch.cat(picks).sort().values


def build_model(args, data: torch.Tensor, labels: torch.Tensor):
    """(denoiser, reference(noise) -> x at sigma_min, reference description)."""
    if args.model == "network":
        net = gs.models.load("cifar10-tiny")
        if tuple(net.shape) != tuple(data.shape[1:]):
            raise ValueError(f"cifar10-tiny samples {net.shape}; run with --resolution {net.shape[-1]}")
        return net, heun_reference(net), "Heun, 100 steps (199 NFE), polynomial rho=7"
    if args.model == "kde":
        kde = KDEDenoiser(data, index=True)           # exact either way; the index skips most rows below sigma ~0.3
        return kde, heun_reference(kde), "Heun, 100 steps (199 NFE), polynomial rho=7"
    if args.model == "gaussian":
        g = GaussianDenoiser.fit(data, rank=args.rank)
        return g, lambda noise: g.flow(SIGMA_MAX * noise, SIGMA_MAX, SIGMA_MIN).to(noise.dtype), \
            "exact (closed-form flow)"
    mog = LowRankMixtureDenoiser.fit(data, labels, rank=args.rank or 32)
    if args.model == "flow":
        mean = sum(w.exp() * c.mean for w, c in zip(mog.log_weights, mog.components))
        flow = FlowDenoiser(GaussianMixtureFlow(mog, mean=mean))
        ref = torch.cat([torch.tensor([math.inf]), gs.schedules.polynomial(99, flow_last_sigma(), FLOW_SIGMA_MAX),
                         torch.zeros(1, dtype=torch.float64)])
        return flow, lambda noise: gs.sample(flow, noise, ref, solver="heun"), \
            "Heun, 101 steps from sigma = inf (polynomial 999 .. the last flow sigma, then a final denoise)"
    return mog, lambda noise: solve_flow(mog, SIGMA_MAX * noise, SIGMA_MAX, SIGMA_MIN, 400).to(noise.dtype), \
        "RK4 in log sigma, 400 steps (1600 NFE)"


def flow_last_sigma() -> float:
    """The last nonzero sigma of the ``sd3`` schedule (flow time FLOW_T_MIN shifted)."""
    return float(gs.schedules.flow_t_to_sigma(gs.schedules.flow_shift(FLOW_T_MIN, FLOW_SHIFT)))


def flow_schedule(name: str, steps: int, search) -> torch.Tensor:
    """``steps`` intervals from sigma = inf to a final denoise (trailing 0): SD3's shifted flow
    times, or inf + a GITS schedule over [last flow sigma, FLOW_SIGMA_MAX] (``search(steps - 2)``) + 0."""
    zero = torch.zeros(1, dtype=torch.float64)
    if name == "sd3":
        return torch.cat([gs.schedules.flow_shifted(steps - 1, t_min=FLOW_T_MIN, shift=FLOW_SHIFT), zero])
    return torch.cat([torch.tensor([math.inf], dtype=torch.float64), search(steps - 2), zero])


def heun_reference(denoiser):
    return lambda noise: metrics.reference_solve(denoiser, noise, 100, "heun", SIGMA_MIN, SIGMA_MAX, progress=True)


def parse_gamma(text: str):
    if text == "sweep":
        return gs.gits.GAMMAS
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "geosample": gs.__version__,
            "date": date.today().isoformat(), "note": "2 CPU cores shared with other jobs: times are noisy"}


def table(results: list[dict], key: str, fmt: str, nfes) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r["solver"], r["schedule"]), {})[r["nfe"]] = r[key]
    lines = ["| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|" + "---|" * (len(nfes) + 2)]
    for (solver, sched), vals in rows.items():
        lines.append(f"| {solver} | {sched} | " + " | ".join(format(vals[n], fmt) if n in vals else "" for n in nfes)
                     + " |")
    return "\n".join(lines)


def gits_gain(results: list[dict], nfes, baseline: str) -> str:
    """Per solver and NFE: RMSE(baseline) / RMSE(gits) - 1, in percent (> 0: GITS better)."""
    by = {(r["solver"], r["schedule"], r["nfe"]): r["rmse"] for r in results}
    solvers = list(dict.fromkeys(r["solver"] for r in results))
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|" + "---|" * (len(nfes) + 1)]
    for s in solvers:
        cells = []
        for n in nfes:
            a, b = by.get((s, baseline, n)), by.get((s, "gits", n))
            cells.append(f"{100 * (a / b - 1):+.0f}%" if a and b else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], solvers, schedules, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(solvers), figsize=(3 * len(solvers), 3.2), sharey=True, squeeze=False)
    for ax, solver in zip(axes[0], solvers):
        for sched in schedules:
            pts = sorted((r["nfe"], r["rmse"]) for r in results if r["solver"] == solver and r["schedule"] == sched)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=sched)
        ax.set_title(solver)
        ax.set_xlabel("NFE")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("RMSE to reference")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    flow = args.model == "flow"
    solvers = (args.solvers or ",".join(s for s in SOLVERS if not (flow and s == "heun"))).split(",")
    schedules = (args.schedules or ",".join(FLOW_SCHEDULES if flow else SCHEDULES)).split(",")
    nfes = [int(n) for n in args.nfes.split(",")]
    gamma = parse_gamma(args.gamma)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("nfe_quality_" + args.model + (f"_{args.tag}" if args.tag else ""))

    path = resolve(args.data)
    images = torch.from_numpy(np.array(load_images(path))).to(torch.float32) / 127.5 - 1
    images = F.avg_pool2d(images, images.shape[-1] // args.resolution) if args.resolution != images.shape[-1] else images
    labels = class_labels(path)
    gen = torch.Generator().manual_seed(args.seed)
    idx = draw_subset(labels, args.data_size, args.subset, gen, args.seed)
    data, data_labels = images[idx].contiguous(), torch.from_numpy(labels)[idx]
    shape = tuple(data.shape[1:])
    denoiser, reference, ref_name = build_model(args, data, data_labels)
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(args.seed + 1))

    pixel = metrics.PixelFeatures(4)
    real = pixel(images[torch.randperm(len(images), generator=gen)[:args.kid_real]]) if args.kid_real else None
    kid = (lambda x: metrics.kid(pixel(x), real, generator=torch.Generator().manual_seed(0))[0]) if args.kid_real \
        else (lambda x: float("nan"))

    t0 = time.perf_counter()
    ref = reference(noise)
    report = {"model": args.model, "data": str(path), "resolution": args.resolution, "n_data": len(data),
              "subset": args.subset if args.data_size else "all", "rank": args.rank, "batch": args.batch,
              "seed": args.seed, "reference": {"method": ref_name, "time_s": time.perf_counter() - t0, "kid": kid(ref)},
              "gits": {"teacher": "ipndm", "teacher_steps": 60, "grid": "polynomial", "metric": "dev",
                       "gamma": args.gamma, "refine": args.refine, "num_warmup": args.num_warmup, "search_s": {},
                       "selected_gamma": {}},
              "machine": machine(), "command": "python " + " ".join(sys.argv), "results": []}
    if args.model == "network":
        report["network"] = {"name": "cifar10-tiny", **denoiser.meta}

    found = {}  # GITS schedules by steps (one gamma: solver-independent) or by (solver, steps) (a sweep, refine)
    span = {"sigma_min": flow_last_sigma(), "sigma_max": FLOW_SIGMA_MAX} if flow else {}

    def gits_sigmas(solver: str, steps: int) -> torch.Tensor:
        key = steps if isinstance(gamma, float) and not args.refine else (solver, steps)
        if key not in found:
            t0 = time.perf_counter()
            found[key] = gs.gits.search(denoiser, shape, steps, gamma=gamma, num_warmup=args.num_warmup,
                                        seed=args.seed, solver=solver, refine=args.refine, use_cache=False, **span)
            report["gits"]["search_s"][f"{solver}/{steps}"] = time.perf_counter() - t0
            report["gits"]["selected_gamma"][f"{solver}/{steps}"] = found[key].gamma
        return found[key].sigmas

    todo = [(s, n, sc) for s in solvers for n in nfes for sc in schedules if _reachable(s, n) and (n >= 3 or not flow)]
    for solver, nfe, sched in tqdm(todo, desc=f"study[{args.model}]"):
        steps = steps_for_nfe(solver, nfe)
        if flow:
            sigmas = flow_schedule(sched, steps, lambda k: gits_sigmas(solver, k))
        elif sched == "gits":
            sigmas = gits_sigmas(solver, steps)
        else:
            sigmas = gs.schedules.by_name(sched, steps)
        calls = gs.solvers.nfe(solver, len(sigmas) - 1, denoise_to_zero=bool(sigmas[-1] == 0))
        if calls != nfe:
            raise ValueError(f"{solver} on {sched} spends {calls} denoiser calls, not {nfe}")
        t0 = time.perf_counter()
        x = gs.sample(denoiser, noise, sigmas, solver=solver)
        elapsed = time.perf_counter() - t0
        mse = float((x.double() - ref.double()).pow(2).mean())
        rmse = math.sqrt(mse)
        report["results"].append({"solver": solver, "schedule": sched, "nfe": nfe, "sigmas": sigmas.tolist(),
                                  "rmse": rmse, "psnr": 20 * math.log10(DATA_RANGE / rmse) if rmse > 0 else math.inf,
                                  "kid_pixel": kid(x), "time_s": elapsed})
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))

    res = report["results"]
    baseline, base_name = ("sd3", "SD3's shifted flow schedule") if flow else ("polynomial", "EDM's polynomial schedule")
    title = (f"{args.model} on CIFAR-10 {args.resolution}x{args.resolution} (N={len(data)}, "
             f"{report['subset']}), {args.batch} samples")
    md = [f"### {title}", "",
          f"Reference: {ref_name}. GITS: iPNDM teacher, 60-step polynomial grid, gamma {args.gamma}, "
          + ("refined by each solver's own error, " if args.refine else "") +
          f"{args.num_warmup} warm-up samples. Command: `{report['command']}` ({report['machine']['date']}, "
          f"{report['machine']['cpus']} shared CPU cores, {args.threads} torch thread(s)).", "",
          "RMSE to the reference (root of the mean squared error over samples and pixels):", "",
          table(res, "rmse", ".4f", nfes), "",
          "PSNR (dB) from that mean squared error, range 2:", "", table(res, "psnr", ".2f", nfes), "",
          f"GITS against {base_name}, RMSE({baseline}) / RMSE(gits) - 1 (positive: GITS better):", "",
          gits_gain(res, nfes, baseline), ""]
    if args.kid_real:
        md += [f"KID x 1e3 (4x4-pooled pixels, unbiased MMD^2, {args.batch} samples vs {args.kid_real} data images; "
               f"the reference scores {1e3 * report['reference']['kid']:.2f}):", "",
               table([{**r, "kid_pixel": 1e3 * r["kid_pixel"]} for r in res], "kid_pixel", ".2f", nfes), ""]
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md))
    plot(res, solvers, schedules, title, stem.with_suffix(".png"))
    print("\n".join(md))
    return 0


def _reachable(solver: str, nfe: int) -> bool:
    """Whether ``solver`` spends exactly ``nfe`` calls in whole steps (2-call solvers: even NFEs)."""
    try:
        steps_for_nfe(solver, nfe)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
