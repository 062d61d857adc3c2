"""``geosample gits``: search a GITS schedule for the closed-form (KDE) denoiser of a dataset."""
from __future__ import annotations

import argparse
import json

HELP = "search a GITS schedule on a dataset's closed-form denoiser, print it and save it as JSON"


def gammas(text: str):
    """'1.15' -> 1.15; '0.9,1.0' -> [0.9, 1.0]; 'sweep' -> geosample.gits.GAMMAS.  A list of whole
    numbers ('1,15') is refused: it is almost always a decimal comma."""
    from ..gits import GAMMAS

    if text == "sweep":
        return list(GAMMAS)
    parts = [v.strip() for v in text.split(",")]
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma must be a number, a comma list of numbers or 'sweep', got {text!r}")
    if len(values) > 1 and all(v.isdigit() for v in parts):
        raise argparse.ArgumentTypeError(f"gamma {text!r} reads as the list {values}: write a decimal with a point "
                                         f"({'.'.join(parts[:2])}), or a list of decimals (0.9,1.0)")
    return values[0] if len(values) == 1 else values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..gits.cost import METRICS
    from ..gits.schedule import GRIDS

    a = parser.add_argument
    a("--data", default="digits", help="dataset name (digits, cifar10) or path (default digits, bundled)")
    a("--steps", type=int, default=5, help="solver steps of the schedule (default 5)")
    a("--solver", default="ipndm", help="solver the schedule is for (judges the AFS step; default ipndm)")
    a("--teacher", default="ipndm", help="teacher solver on the fine grid (default ipndm)")
    a("--teacher-steps", type=int, default=60, help="fine grid steps (default 60, i.e. 61 points)")
    a("--grid", choices=GRIDS, default="polynomial", help="fine grid family (default polynomial)")
    a("--rho", type=float, default=7.0, help="fine grid rho (default 7)")
    a("--metric", choices=METRICS, default="dev", help="cost metric (default dev)")
    a("--gamma", type=gammas, default=1.15,
      help="DP discount gamma (default 1.15); a comma list (0.9,1.0,1.15) or 'sweep' (0.8 to 1.3) "
           "keeps the gamma whose schedule brings --solver closest to the teacher")
    a("--num-warmup", type=int, default=256, help="teacher samples (default 256)")
    a("--batch-size", type=int, default=64, help="teacher samples per round (default 64)")
    a("--seed", type=int, default=0, help="noise seed (default 0)")
    a("--afs", action="store_true", help="add the analytical first step (one more step, same NFE)")
    a("--refine", action="store_true",
      help="refine the path by --solver's own error to the teacher (with --gamma sweep: the recommended search)")
    a("--sigma-min", type=float, default=0.002)
    a("--sigma-max", type=float, default=80.0)
    a("--device", default="cpu", help="torch device (default cpu)")
    a("--out", default="gits_schedule.json", help="where to save the schedule (default gits_schedule.json)")
    a("--no-cache", action="store_true", help="neither read nor write the schedule cache")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import gits
    from .._io import check_out_file
    from ..data import load_dataset
    from ..denoisers.kde import KDEDenoiser
    from ..distributed import init_from_env

    check_out_file(args.out)
    data = torch.as_tensor(load_dataset(args.data)).to(args.device)
    options = dict(teacher=args.teacher, teacher_steps=args.teacher_steps, grid=args.grid, metric=args.metric,
                   gamma=args.gamma, num_warmup=args.num_warmup, seed=args.seed, batch_size=args.batch_size,
                   afs=args.afs, refine=args.refine, solver=args.solver, sigma_min=args.sigma_min,
                   sigma_max=args.sigma_max, rho=args.rho)
    shape = tuple(data.shape[1:])
    if init_from_env():  # under torchrun: dataset sharded, teacher split, rank 0 writes
        from .. import distributed as gd

        sched = gd.gits_search(gd.closed_form_denoiser(data), shape, args.steps, device=args.device,
                               progress=gd.is_main(), **options)
        if not gd.is_main():
            return 0
    else:
        sched = gits.search(KDEDenoiser(data), shape, args.steps, device=args.device, progress=True,
                            use_cache=not args.no_cache, **options)
    sched.save(args.out)
    print(json.dumps({"sigmas": [round(s, 6) for s in sched.sigmas.tolist()], "indices": sched.indices,
                      "nfe": sched.params["nfe"], "cost": round(sched.cost, 6),
                      "gamma": sched.gamma, "saved": args.out}))
    return 0
