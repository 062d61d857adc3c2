"""``geosample gits``: search a GITS schedule for a dataset's closed-form denoiser or a shipped network.

The flags it shares with ``geosample sample`` (:mod:`.common`) have the same defaults, so
``geosample gits`` then ``geosample sample`` with the same flags find the schedule in the cache.
"""
from __future__ import annotations

import argparse
import json

from .common import add_gits_arguments, add_source_arguments, check_counts, gammas, load_source, search_options

__all__ = ["HELP", "add_arguments", "run", "gammas"]

HELP = "search a GITS schedule (closed-form denoiser of a dataset, or a shipped network), print it, save it as JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..gits.cost import METRICS
    from ..gits.schedule import GRIDS

    add_source_arguments(parser)
    add_gits_arguments(parser)
    a = parser.add_argument
    a("--steps", type=int, default=None, help="solver steps of the schedule (default: those of --nfe calls)")
    a("--teacher", default="ipndm", help="teacher solver on the fine grid (default ipndm)")
    a("--teacher-steps", type=int, default=60, help="fine grid steps (default 60, i.e. 61 points)")
    a("--grid", choices=GRIDS, default="polynomial", help="fine grid family (default polynomial)")
    a("--rho", type=float, default=7.0, help="fine grid rho (default 7)")
    a("--metric", choices=METRICS, default="dev", help="cost metric (default dev)")
    a("--batch-size", type=int, default=64, help="teacher samples per round (default 64)")
    a("--sigma-min", type=float, default=0.002)
    a("--sigma-max", type=float, default=80.0)
    a("--out", default="gits_schedule.json", help="where to save the schedule (default gits_schedule.json)")


def run(args: argparse.Namespace) -> int:
    from .. import gits
    from .._io import check_out_file
    from ..distributed import init_from_env
    from ..solvers import steps_for_nfe

    check_counts(args, "nfe", "teacher_steps", "batch_size", *(("steps",) if args.steps is not None else ()))
    steps = args.steps if args.steps is not None else steps_for_nfe(args.solver, args.nfe, args.afs) - int(args.afs)
    if steps < 1:
        raise ValueError(f"--afs needs at least 2 steps; got nfe={args.nfe} for {args.solver}")
    check_out_file(args.out)
    options = dict(search_options(args), teacher=args.teacher, teacher_steps=args.teacher_steps, grid=args.grid,
                   metric=args.metric, batch_size=args.batch_size, sigma_min=args.sigma_min,
                   sigma_max=args.sigma_max, rho=args.rho)
    if init_from_env():  # under torchrun: dataset sharded, teacher split, rank 0 writes
        from .. import distributed as gd

        denoiser, shape, _, _ = load_source(args, make_denoiser=gd.closed_form_denoiser)
        sched = gd.gits_search(denoiser, shape, steps, device=args.device, progress=gd.is_main(), **options)
        if not gd.is_main():
            return 0
    else:
        denoiser, shape, _, _ = load_source(args)
        sched = gits.search(denoiser, shape, steps, device=args.device, progress=True, use_cache=not args.no_cache,
                            **options)
    sched.save(args.out)
    print(json.dumps({"sigmas": [round(s, 6) for s in sched.sigmas.tolist()], "indices": sched.indices,
                      "nfe": sched.params["nfe"], "cost": round(sched.cost, 6), "gamma": sched.gamma,
                      "selected": sched.params.get("selected", "dp"), "calls": sched.params["calls"],
                      "saved": args.out}))
    return 0
