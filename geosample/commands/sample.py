"""``geosample sample``: the main job.  With no options, on the bundled 8x8 digits:

1. closed-form (KDE) denoiser of the dataset;
2. the recommended GITS search (:func:`geosample.gits.search` with ``gamma=GAMMAS, refine=True``:
   iPNDM teacher on a 60-step polynomial grid; the DP paths of every gamma and the hand-made
   schedules judged, refined and checked by iPNDM's own error; warm-up noise seeded ``--seed + 1``,
   never the noise scored below) for an iPNDM schedule of NFE 6;
3. iPNDM samples from the same seeded noise on that schedule and on EDM's polynomial rho=7 one;
4. a reference solve (Heun, 100 steps, polynomial rho=7) from the same noise; per schedule the
   RMSE and PSNR to it (:func:`geosample.metrics.reference_error`) and the wall time;
5. publishes ``samples.png`` (one labelled panel per schedule, then the reference),
   ``schedule.json`` and ``report.json`` into ``--out`` as one set with a ``manifest.json`` naming
   the run (:func:`geosample._io.publish_run`), and prints a table.  ``--out`` is checked
   (a writable folder) before any work starts.
With ``--amed`` one more row: AMED on ``--solver`` at ``--nfe`` (:mod:`.sample_amed`; ``amed.pt`` joins
the published set).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import check_out_dir, json_bytes, publish_run, run_id, versions
from ..figures import labelled_panels, png_bytes
from ..solvers import steps_for_nfe
from .common import (SCHEDULES, add_gits_arguments, add_source_arguments, check_counts, load_source,
                     make_schedule, search_options)
from . import sample_amed

if TYPE_CHECKING:  # imported lazily at run time, so that `geosample --help` stays fast
    import torch

HELP = "the main job: GITS vs EDM schedule on a dataset's closed-form denoiser (samples.png, report.json)"
BASELINE = "polynomial"
REFERENCE = {"solver": "heun", "steps": 100}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    add_gits_arguments(parser)
    a = parser.add_argument
    a("--schedule", default="gits", help="gits | polynomial | logsnr | time_uniform | a schedule .json (default gits)")
    a("--batch", type=int, default=64, help="samples (default 64)")
    a("--out", default="geosample-out", help="output folder (default ./geosample-out)")
    sample_amed.add_arguments(a)


def _table(rows: list[dict]) -> str:
    lines = [f"{'schedule':<14}{'solver':<8}{'NFE':>4}{'RMSE':>10}{'PSNR dB':>9}{'time s':>8}"]
    lines += [f"{r['schedule']:<14}{r['solver']:<8}{r['nfe']:>4}{r['rmse']:>10.4f}{r['psnr']:>9.2f}{r['time_s']:>8.2f}"
              for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import init_from_env
    from ..metrics import reference_error, reference_solve
    from ..solvers import get_solver
    from ..solvers import nfe as count_nfe
    from ..solvers import sample

    t_start = time.perf_counter()
    solver = get_solver(args.solver).name
    check_counts(args, "batch", "nfe")
    steps_for_nfe(solver, args.nfe, args.afs)
    sample_amed.check(args, solver)
    if args.schedule != "gits":
        make_schedule(args.schedule, solver, args.nfe, afs=args.afs)   # a bad name or file fails here, not later
    out = check_out_dir(args.out)
    parallel = init_from_env()  # under torchrun: the dataset sharded over ranks, rank 0 reports
    if parallel:
        from .. import distributed as gd
        main, ranks, sample, make_denoiser = gd.is_main(), gd.world_size(), gd.sample, gd.closed_form_denoiser
    else:
        main, ranks, make_denoiser = True, 1, None
    say = print if main else (lambda *a, **k: None)
    denoiser, shape, source, data = load_source(args, make_denoiser)
    say(f"geosample sample: {source}, solver={solver}, NFE={args.nfe}, "
        f"schedule={args.schedule}, batch={args.batch}, device={args.device}, threads={torch.get_num_threads()}, "
        f"ranks={ranks}")

    t0 = time.perf_counter()
    options = {k: v for k, v in search_options(args).items() if k not in ("solver", "afs")}
    sigmas, found = make_schedule(args.schedule, solver, args.nfe, denoiser, shape, afs=args.afs, device=args.device,
                                  use_cache=not args.no_cache, progress=main, distributed=parallel, **options)
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
    amed = None
    if args.amed is not None:
        if parallel:
            raise ValueError("--amed trains on one process; run it without torchrun")
        amed_row, x, amed_file, amed = sample_amed.row(args, solver, denoiser, shape, noise, ref, found, main)
        rows.append(amed_row)
        panels.append((f"amed ({amed_row['solver']}, NFE {amed_row['nfe']}) RMSE {amed_row['rmse']:.3f}", x))
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
    report = {"run": run, "data": None if args.model else (args.data or "digits"), "model": args.model,
              "data_shape": None if data is None else list(data.shape), "solver": solver, "nfe": args.nfe,
              "afs": args.afs, "schedule": args.schedule, "batch": args.batch, "seed": args.seed,
              "device": str(args.device),
              "reference": {**REFERENCE, "nfe": count_nfe(REFERENCE["solver"], REFERENCE["steps"]),
                            "schedule": "polynomial rho=7", "time_s": ref_s},
              "gits": None if found is None else {k: found.params.get(k) for k in (
                  "selected", "selected_gamma", "num_warmup", "seed", "calls", "candidates", "refinement", "check")},
              "schedule_search_s": search_s, "rows": rows, "amed": amed, "total_s": time.perf_counter() - t_start,
              "versions": versions()}
    if amed is not None:
        files["amed.pt"] = amed_file
    files["report.json"] = json_bytes(report)
    publish_run(out, files, {"run": run, "command": "sample"})
    written = [out / name for name in files]
    print(_table(rows))
    print(f"schedule search {search_s:.1f} s, reference solve {ref_s:.1f} s, total {report['total_s']:.1f} s; "
          f"wrote {', '.join(map(str, written))}")
    return 0
