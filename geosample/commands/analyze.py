"""``geosample analyze``: the papers' trajectory geometry on a dataset's closed-form denoiser or a
shipped trained network.

Solves ``--num`` seeded trajectories with ``--solver`` on ``--steps`` polynomial (rho=7) steps
from sigma_max = 80 to sigma_min = 0.002 with ``KDEDenoiser(data)`` (or ``--model``), measures them with
:mod:`geosample.geometry` and publishes into ``--out`` as one set with a ``manifest.json`` naming
the run (:func:`geosample._io.publish_run`; ``--out`` is checked before any work starts):

* ``boomerang.png``: deviation from the chord (sampling and denoising trajectories, relative to
  the chord length), distance to the final sample, and cos(ODE direction, x_t - x_end), vs sigma;
  mean, 10-90% band and a few samples;
* ``explained_variance.png``: cumulative explained variance vs k, chord removed and plain PCA;
* ``projection_3d.png``: all trajectories on (chord, PC1, PC2), aligned by orthogonal Procrustes;
* ``curvature.png``: curvature and torsion along the path (local cubic fit, ``--window``; torsion is
  meaningless where the path is straight, i.e. once the KDE posterior has collapsed onto one image);
* ``analysis.json``: the numbers (per-step means and quantiles, per-sample summaries).
"""
from __future__ import annotations

import argparse
import time

from .common import add_source_arguments, check_counts, load_source

HELP = "trajectory geometry on a closed-form denoiser or a trained network: boomerang, PCA, 3-D projections (PNGs + analysis.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    a = parser.add_argument
    a("--steps", type=int, default=100, help="solver steps on the polynomial rho=7 grid (default 100)")
    a("--solver", default="euler", help="solver (default euler); see geosample.SOLVERS")
    a("--num", type=int, default=64, help="trajectories (default 64)")
    a("--seed", type=int, default=0, help="noise seed (default 0)")
    a("--window", type=int, default=3, help="curvature fit: points on each side (default 3)")
    a("--dtype", default="float64", choices=("float64", "float32"),
      help="dtype of the trajectory (default float64: in float32, rounding of the stored states dominates the "
           "curvature at small sigma; float32 is ~3x faster on CPU)")
    a("--out", default="geosample-analyze", help="output folder (default ./geosample-analyze)")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import schedules
    from ..solvers import get_solver, sample
    from .._io import check_out_dir, json_bytes, publish_run, run_id, versions
    from ..figures import geometry_figures
    from ..geometry import measure, report

    t_start = time.perf_counter()
    solver = get_solver(args.solver).name
    check_counts(args, "num", "steps")
    if args.window < 2:
        raise ValueError(f"--window must be >= 2, got {args.window}")
    out = check_out_dir(args.out)
    dtype = getattr(torch, args.dtype)
    denoiser, shape, source, data = load_source(args, dtype=dtype)
    print(f"geosample analyze: {source}, solver={solver}, steps={args.steps}, num={args.num}, device={args.device}")
    noise = torch.randn((args.num, *shape), generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
    noise = noise.to(args.device)
    t0 = time.perf_counter()
    traj = sample(denoiser, noise, schedules.polynomial(args.steps), solver=solver, return_trajectory=True,
                  progress=True)
    sample_s = time.perf_counter() - t0
    traj.x, traj.denoised = traj.x.cpu(), traj.denoised.cpu()

    t0 = time.perf_counter()
    m = measure(traj, window=args.window)
    numbers = {"data": None if args.model else (args.data or "digits"), "model": args.model,
               "data_shape": None if data is None else list(data.shape), "solver": solver, "steps": args.steps,
               "schedule": "polynomial rho=7", "num": args.num, "seed": args.seed, "window": args.window, "dtype": args.dtype,
               **report(m), "sample_s": sample_s, "measure_s": time.perf_counter() - t0}
    title = f"{args.model or args.data} ({solver}, {args.steps} steps, {args.num} samples)"
    files = {f"{name}.png": blob for name, blob in geometry_figures(m, title).items()}
    run = run_id()
    numbers.update(run=run, total_s=time.perf_counter() - t_start, versions=versions())
    files["analysis.json"] = json_bytes(numbers)
    publish_run(out, files, {"run": run, "command": "analyze"})
    ev = numbers["explained_variance_top2_chord_removed"]
    print(f"top-2 chord-orthogonal explained variance: min {ev['min']:.4f}, mean {ev['mean']:.4f}\n"
          f"deviation single bump: {numbers['deviation_single_bump_fraction']:.0%} of samples, "
          f"shape correlation with the mean: min {numbers['shape_correlation_with_mean']['min']:.4f}\n"
          f"sampling {sample_s:.1f} s, total {numbers['total_s']:.1f} s; wrote {out}/{{boomerang,explained_variance,"
          f"projection_3d,curvature}}.png and analysis.json")
    return 0
