"""``geosample sample``: the main job.  With no options, on the bundled 8x8 digits:

1. closed-form (KDE) denoiser of the dataset;
2. GITS search (iPNDM teacher, 60-step polynomial fine grid, gamma picked from
   :data:`geosample.gits.GAMMAS` by iPNDM's error to the teacher, the path then refined by that
   error, ``refine=True``; warm-up noise seeded ``--seed + 1``, never the noise scored below) for
   an iPNDM schedule of NFE 6;
3. iPNDM samples from the same seeded noise on that schedule and on EDM's polynomial rho=7 one;
4. a reference solve (Heun, 100 steps, polynomial rho=7) from the same noise; per schedule the
   RMSE and PSNR to it (:func:`geosample.metrics.reference_error`) and the wall time;
5. publishes ``samples.png`` (one labelled panel per schedule, then the reference),
   ``schedule.json`` and ``report.json`` into ``--out`` as one set with a ``manifest.json`` naming
   the run (:func:`geosample._io.publish_run`), and prints a table.  ``--out`` is checked
   (a writable folder) before any work starts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import check_out_dir, json_bytes, publish_run, run_id, versions
from ..figures import labelled_panels, png_bytes
from ..solvers import steps_for_nfe
from .gits import gammas

if TYPE_CHECKING:  # imported lazily at run time, so that `geosample --help` stays fast
    import torch

HELP = "the main job: GITS vs EDM schedule on a dataset's closed-form denoiser (samples.png, report.json)"
SCHEDULES = ("gits", "polynomial", "logsnr", "time_uniform")
BASELINE = "polynomial"
REFERENCE = {"solver": "heun", "steps": 100}
SMALL = 1024  # values per sample below which --threads 0 means one thread


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--data", default="digits", help="dataset name (digits, cifar10) or path (default digits, bundled)")
    a("--limit", type=int, default=None, help="use a seeded random subset of LIMIT images (the same for every run; image sets are often sorted by class)")
    a("--model", default=None, help="sample a shipped trained denoiser (e.g. cifar10-tiny; see "
      "geosample.models.available()) instead of --data's closed form")
    a("--solver", default="ipndm", help="solver (default ipndm); see geosample.SOLVERS")
    a("--nfe", type=int, default=6, help="denoiser calls per sample (default 6); heun/dpm2 use 2 per step")
    a("--schedule", default="gits", help="gits | polynomial | logsnr | time_uniform | a schedule .json (default gits)")
    a("--batch", type=int, default=64, help="samples (default 64)")
    a("--seed", type=int, default=0, help="noise seed (default 0)")
    a("--device", default="cpu", help="torch device (default cpu)")
    a("--out", default="geosample-out", help="output folder (default ./geosample-out)")
    a("--afs", action="store_true", help="analytical first step (saves one denoiser call)")
    a("--threads", type=int, default=0, help="torch CPU threads (default 0: 1 for small samples (< 1024 values, "
      "e.g. digits), where thread start-up costs more than it saves, else torch's default)")
    a("--num-warmup", type=int, default=256, help="GITS teacher samples (default 256)")
    a("--gamma", type=gammas, default="sweep",
      help="GITS DP discount: 'sweep' (default: the gamma in 0.8-1.3 whose schedule brings --solver closest "
           "to the teacher), a comma list to pick from, or one value (1.15: the reference's)")
    a("--refine", action=argparse.BooleanOptionalAction, default=True,
      help="refine the GITS path by --solver's own error to the teacher (default on; --no-refine with "
           "--gamma 1.15 is the reference's search)")
    a("--no-cache", action="store_true", help="do not read or write the GITS schedule cache")


def make_schedule(name: str, solver: str, nfe: int, denoiser=None, shape=None, *, afs: bool = False,
                  seed: int = 0, num_warmup: int = 256, gamma=1.15, refine: bool = False, device="cpu",
                  use_cache: bool = True, progress: bool = False, distributed: bool = False):
    """(sigmas, gits_schedule_or_None) for ``name`` with ``nfe`` calls of ``solver``.

    gits: :func:`geosample.gits.search` with the defaults (iPNDM teacher, 60-step polynomial
    grid, dev metric, ``num_warmup`` teacher samples from ``seed``), ``gamma`` (one value, or a
    sequence to pick from for ``solver``) and ``refine`` for ``denoiser`` on samples of ``shape``;
    with ``afs`` it searches one step fewer and inserts the free analytical first step.
    ``distributed``: :func:`geosample.distributed.gits_search` (teacher split across ranks, no cache).
    """
    from .. import gits, schedules

    steps = steps_for_nfe(solver, nfe, afs)
    if name == "gits":
        if steps - int(afs) < 1:
            raise ValueError(f"GITS with afs needs at least 2 steps; got nfe={nfe} for {solver}")
        if distributed:
            from ..distributed import gits_search as search
            cache = {}
        else:
            search, cache = gits.search, {"use_cache": use_cache}
        found = search(denoiser, shape, steps - int(afs), seed=seed, num_warmup=num_warmup, gamma=gamma, afs=afs,
                       refine=refine, solver=solver, device=device, progress=progress, **cache)
        return found.sigmas, found
    if name.endswith(".json"):
        return gits.load_sigmas(name), None
    if name in SCHEDULES:
        return schedules.by_name(name, steps), None
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)} or a .json file")


def _table(rows: list[dict]) -> str:
    lines = [f"{'schedule':<14}{'solver':<8}{'NFE':>4}{'RMSE':>10}{'PSNR dB':>9}{'time s':>8}"]
    lines += [f"{r['schedule']:<14}{r['solver']:<8}{r['nfe']:>4}{r['rmse']:>10.4f}{r['psnr']:>9.2f}{r['time_s']:>8.2f}"
              for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_dataset
    from ..denoisers.kde import KDEDenoiser
    from ..distributed import init_from_env
    from ..metrics import reference_error, reference_solve
    from ..solvers import get_solver
    from ..solvers import nfe as count_nfe
    from ..solvers import sample

    t_start = time.perf_counter()
    solver = get_solver(args.solver).name
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    steps_for_nfe(solver, args.nfe, args.afs)
    if args.schedule != "gits":
        make_schedule(args.schedule, solver, args.nfe, afs=args.afs)   # a bad name or file fails here, not later
    out = check_out_dir(args.out)
    parallel = init_from_env()  # under torchrun: the dataset sharded over ranks, rank 0 reports
    if parallel:
        from .. import distributed as gd
        main, ranks, sample, make_denoiser = gd.is_main(), gd.world_size(), gd.sample, gd.closed_form_denoiser
    else:
        main, ranks, make_denoiser = True, 1, KDEDenoiser
    say = print if main else (lambda *a, **k: None)

    if args.model:
        from ..models import load
        denoiser = load(args.model, device=args.device)
        shape, source = denoiser.shape, f"model={args.model}"
    else:
        data = torch.as_tensor(load_dataset(args.data, limit=args.limit)).to(args.device)
        denoiser = make_denoiser(data)
        shape, source = tuple(data.shape[1:]), f"data={args.data} {tuple(data.shape)}"
    if args.threads or torch.Size(shape).numel() < SMALL:
        torch.set_num_threads(args.threads or 1)
    say(f"geosample sample: {source}, solver={solver}, NFE={args.nfe}, "
        f"schedule={args.schedule}, batch={args.batch}, device={args.device}, threads={torch.get_num_threads()}, "
        f"ranks={ranks}")

    t0 = time.perf_counter()
    sigmas, found = make_schedule(args.schedule, solver, args.nfe, denoiser, shape, afs=args.afs, seed=args.seed + 1,
                                  num_warmup=args.num_warmup, gamma=args.gamma, refine=args.refine, device=args.device,
                                  use_cache=not args.no_cache, progress=main, distributed=parallel)
    search_s = time.perf_counter() - t0
    grids = {args.schedule: sigmas}
    if args.schedule != BASELINE:
        grids[BASELINE] = make_schedule(BASELINE, solver, args.nfe, afs=args.afs)[0]

    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    t0 = time.perf_counter()
    ref = reference_solve(denoiser, noise, steps=REFERENCE["steps"], solver=REFERENCE["solver"], progress=main,
                          sample=sample)
    ref_s = time.perf_counter() - t0

    rows, panels = [], []
    for name, sig in grids.items():
        label = Path(name).stem if name.endswith(".json") else name
        t0 = time.perf_counter()
        x = sample(denoiser, noise, sig, solver=solver, afs=args.afs, progress=main)
        elapsed = time.perf_counter() - t0
        err = reference_error(x, ref)
        n = count_nfe(solver, len(sig) - 1, afs=args.afs, denoise_to_zero=float(sig[-1]) == 0.0)
        rows.append({"schedule": label, "solver": solver, "nfe": n, "afs": args.afs,
                     "sigmas": sig.tolist(), "rmse": err["rmse"], "psnr": err["psnr"],
                     "time_s": elapsed})
        panels.append((f"{label} ({solver}, NFE {n}) RMSE {err['rmse']:.3f}", x))
    panels.append((f"reference ({REFERENCE['solver']}, {REFERENCE['steps']} steps)", ref))
    if not main:
        return 0

    files = {}
    if len(shape) == 3 and shape[0] in (1, 3):
        files["samples.png"] = png_bytes(labelled_panels(panels))
    if found is not None:
        files["schedule.json"] = json_bytes(found.to_dict())
    else:
        files["schedule.json"] = json_bytes({"schedule": rows[0]["schedule"], "solver": solver, "nfe": rows[0]["nfe"],
                                             "afs": args.afs, "sigmas": rows[0]["sigmas"]})
    run = run_id()
    report = {"run": run, "data": None if args.model else args.data, "model": args.model,
              "data_shape": None if args.model else list(data.shape), "solver": solver, "nfe": args.nfe,
              "afs": args.afs, "schedule": args.schedule, "batch": args.batch, "seed": args.seed,
              "device": str(args.device),
              "reference": {**REFERENCE, "nfe": count_nfe(REFERENCE["solver"], REFERENCE["steps"]),
                            "schedule": "polynomial rho=7", "time_s": ref_s},
              "gits_gamma": found.gamma if found is not None else None,
              "gits_refinement": found.params.get("refinement") if found is not None else None,
              "schedule_search_s": search_s, "rows": rows, "total_s": time.perf_counter() - t_start,
              "versions": versions()}
    files["report.json"] = json_bytes(report)
    publish_run(out, files, {"run": run, "command": "sample"})
    written = [out / name for name in files]
    print(_table(rows))
    print(f"schedule search {search_s:.1f} s, reference solve {ref_s:.1f} s, total {report['total_s']:.1f} s; "
          f"wrote {', '.join(map(str, written))}")
    return 0
