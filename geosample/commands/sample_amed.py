"""``geosample sample --amed``: one more row, AMED on ``--solver`` at ``--nfe``, beside GITS and EDM.

``--amed`` trains a predictor (:func:`geosample.amed.train`, cached like GITS schedules) on the
same warm-up noise seed as the GITS search (``--num-warmup`` teacher trajectories when given, else
the trainer's default); ``--amed PATH`` loads one (checked against the model).
Base grid: with a GITS schedule of 2K steps (one-call solvers, no AFS) its even points, and its
odd points as the starting intermediate times (so training starts from the GITS schedule and
learns per-sample corrections); with one of K steps (two-call solvers) the schedule itself;
otherwise EDM's polynomial schedule of K steps.
"""
from __future__ import annotations

import io
import math
import time

from ..solvers import amed as amed_solvers

__all__ = ["add_arguments", "check", "row"]


def add_arguments(a) -> None:
    a("--amed", nargs="?", const="train", default=None, metavar="PATH",
      help="add AMED on --solver (euler, dpm2, ipndm, dpmpp) at --nfe: train a predictor (cached), or load PATH")
    a("--amed-epochs", type=int, default=8, help="AMED training epochs (default 8)")


def check(args, solver: str) -> None:
    """Fail before any work: a solver AMED runs on, an NFE it can make."""
    if args.amed is None:
        return
    if solver not in amed_solvers.VARIANTS or solver == "amed":
        raise ValueError(f"--amed runs the AMED-Plugin on --solver euler, dpm2, ipndm or dpmpp, got {solver!r}")
    amed_solvers.steps_for_nfe(args.nfe, args.afs)


def base_grid(found, K: int):
    """(base sigmas, starting predictions or None, name) for K intervals (see the module docstring)."""
    import torch

    from .. import schedules
    from ..amed import Fixed

    if found is not None and len(found.sigmas) == 2 * K + 1:
        s = found.sigmas.tolist()
        r = [math.log(s[2 * i + 1] / s[2 * i]) / math.log(s[2 * i + 2] / s[2 * i]) for i in range(K)]
        return torch.tensor(s[::2], dtype=torch.float64), Fixed(r), "gits"
    if found is not None and len(found.sigmas) == K + 1:
        return found.sigmas, None, "gits"
    return schedules.polynomial(K), None, "polynomial"


def row(args, solver, denoiser, shape, noise, ref, found, progress: bool):
    """(report row, samples, predictor file bytes, record) of the AMED run."""
    import torch

    from .. import amed
    from ..metrics import reference_error
    from ..solvers import sample

    t0 = time.perf_counter()
    if args.amed == "train":
        K = amed_solvers.steps_for_nfe(args.nfe, args.afs)
        base, init, name = base_grid(found, K)
        samples = {} if args.num_warmup is None else {"num_samples": args.num_warmup}
        predictor = amed.train(denoiser, shape, base, solver=solver, afs=args.afs, epochs=args.amed_epochs,
                               init=init, seed=args.seed + 1, device=args.device, use_cache=not args.no_cache,
                               progress=progress, **samples)
    else:
        predictor, name = amed.load(args.amed, denoiser=denoiser, device=args.device), "file"
    train_s = time.perf_counter() - t0
    sig = predictor.sigmas
    t0 = time.perf_counter()
    traj = sample(denoiser, noise, sig, solver=predictor.solver, afs=predictor.afs, amed=predictor,
                  return_trajectory=True)
    elapsed = time.perf_counter() - t0
    err = reference_error(traj.x[-1], ref)
    out = {"schedule": "amed", "solver": traj.solver, "nfe": traj.nfe, "afs": predictor.afs, "sigmas": sig.tolist(),
           "rmse": err["rmse"], "psnr": err["psnr"], "time_s": elapsed}
    blob = io.BytesIO()
    torch.save(predictor.to_blob(), blob)
    record = {"base": name, "features": predictor.features, "train_or_load_s": train_s,
              "mean_predictions": predictor.meta["mean"], "training": predictor.meta["training"]}
    return out, traj.x[-1], blob.getvalue(), record
