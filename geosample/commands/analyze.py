"""``geosample analyze``: the papers' trajectory geometry on a dataset's closed-form denoiser.

Solves ``--num`` seeded trajectories with ``--solver`` on ``--steps`` polynomial (rho=7) steps
from sigma_max = 80 to sigma_min = 0.002 with ``KDEDenoiser(data)``, measures them with
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
import io
import time

HELP = "trajectory geometry on a dataset's closed-form denoiser: boomerang, PCA, 3-D projections (PNGs + analysis.json)"
QUANTILES = (0.1, 0.5, 0.9)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--data", default="digits", help="dataset name (digits, cifar10) or path (default digits, bundled)")
    a("--limit", type=int, default=None, help="use a seeded random subset of LIMIT images (the same for every run; image sets are often sorted by class)")
    a("--steps", type=int, default=100, help="solver steps on the polynomial rho=7 grid (default 100)")
    a("--solver", default="euler", help="solver (default euler); see geosample.SOLVERS")
    a("--num", type=int, default=64, help="trajectories (default 64)")
    a("--seed", type=int, default=0, help="noise seed (default 0)")
    a("--window", type=int, default=3, help="curvature fit: points on each side (default 3)")
    a("--dtype", default="float64", choices=("float64", "float32"),
      help="dtype of the trajectory (default float64: in float32, rounding of the stored states dominates the "
           "curvature at small sigma; float32 is ~3x faster on CPU)")
    a("--device", default="cpu", help="torch device for sampling (default cpu)")
    a("--out", default="geosample-analyze", help="output folder (default ./geosample-analyze)")


def _stats(v) -> dict:
    """Per-step mean and quantiles over samples of v [B, T] as lists."""
    import torch

    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype), dim=0)
    return {"mean": v.mean(0).tolist(), **{f"q{int(100 * p)}": q[i].tolist() for i, p in enumerate(QUANTILES)}}


def _summary(v) -> dict:
    """min / mean / max of a per-sample value v [B]."""
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


def _shape_similarity(curves):
    """Pearson correlation of each curve [B, T] with the mean curve over t, [B]."""
    c = curves - curves.mean(1, keepdim=True)
    m = c.mean(0, keepdim=True)
    return (c * m).sum(1) / (c.norm(dim=1) * m.norm(dim=1))


def measure(traj, window: int = 3) -> dict:
    """All measurements of a batch of trajectories (tensors), see the module docstring."""
    from .. import geometry as g

    dev, dev_d = g.deviation(traj), g.deviation(traj, "denoised")
    chord = g.distance_to_end(traj)[:, 0]
    rel = dev / chord[:, None]
    kappa, tau = g.curvature_torsion(traj, window=window)
    coords = g.project_3d(traj)
    aligned, _ = g.procrustes_align(coords)
    return {"sigmas": traj.sigmas, "deviation": dev, "relative_deviation": rel, "deviation_denoised": dev_d,
            "distance_to_end": g.distance_to_end(traj), "norms": g.norms(traj), "cosine": g.direction_cosine(traj),
            "ev_chord": g.explained_variance_curve(traj, min(10, traj.x.shape[0])),
            "ev_plain": g.explained_variance_curve(traj, min(10, traj.x.shape[0]), remove_chord=False),
            "ev_denoised": g.explained_variance_curve(traj, min(10, traj.denoised.shape[0]), which="denoised"),
            "kappa": kappa, "tau": tau, "coords": coords, "aligned": aligned,
            "single_bump": g.is_single_bump(dev), "single_bump_denoised": g.is_single_bump(dev_d),
            "shape_corr": _shape_similarity(rel), "chord": chord}


def report(m: dict) -> dict:
    """The JSON-ready numbers of :func:`measure`'s output."""
    sig = m["sigmas"]
    peak = m["relative_deviation"].argmax(1)
    return {
        "sigmas": sig.tolist(),
        "explained_variance_top2_chord_removed": _summary(m["ev_chord"][:, 1]),
        "explained_variance_top2_fraction_ge_0.99": float((m["ev_chord"][:, 1] >= 0.99).double().mean()),
        "explained_variance_top2_plain": _summary(m["ev_plain"][:, 1]),
        "explained_variance_top2_denoised_chord_removed": _summary(m["ev_denoised"][:, 1]),
        "explained_variance_curve_chord_removed": _stats(m["ev_chord"]),
        "explained_variance_curve_plain": _stats(m["ev_plain"]),
        "deviation_single_bump_fraction": float(m["single_bump"].double().mean()),
        "deviation_denoised_single_bump_fraction": float(m["single_bump_denoised"].double().mean()),
        "deviation_ends_max_abs": float(m["deviation"][:, [0, -1]].abs().max()),
        "relative_deviation_peak": _summary(m["relative_deviation"].amax(1)),
        "relative_deviation_peak_sigma": _summary(sig[peak].double()),
        "shape_correlation_with_mean": _summary(m["shape_corr"]),
        "chord_length": _summary(m["chord"]),
        "relative_deviation": _stats(m["relative_deviation"]),
        "deviation_denoised": _stats(m["deviation_denoised"]),
        "distance_to_end": _stats(m["distance_to_end"]),
        "norm_x": _stats(m["norms"]["x"]), "norm_denoised": _stats(m["norms"]["denoised"]),
        "norm_direction": _stats(m["norms"]["direction"]),
        "cosine_direction_to_end": _stats(m["cosine"]),
        "curvature": _stats(m["kappa"]), "torsion": _stats(m["tau"]),
    }


def _band(ax, x, v, color, label, show=4):
    """Mean line, 10-90% band and ``show`` individual samples of v [B, T] against x [T]."""
    import torch

    q = torch.quantile(v, torch.tensor([0.1, 0.9], dtype=v.dtype), dim=0)
    ax.fill_between(x, q[0], q[1], color=color, alpha=0.25, lw=0)
    for row in v[:show]:
        ax.plot(x, row, color=color, lw=0.5, alpha=0.6)
    ax.plot(x, v.mean(0), color=color, lw=2, label=label)


def _sigma_axis(ax, ylabel, logy=False):
    ax.set_xscale("log")
    ax.invert_xaxis()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("sigma (sampling runs right)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def figures(m: dict, title: str) -> dict:
    """name -> PNG bytes for the four figures."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("geosample analyze needs matplotlib: pip install 'geosample[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    s = m["sigmas"].numpy()
    out = {}

    def png(fig, name):
        fig.subplots_adjust(left=0.08, right=0.97, bottom=0.11, top=0.88, wspace=0.28, hspace=0.32)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out[name] = buf.getvalue()

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    _band(ax[0, 0], s, m["relative_deviation"], "C0", "sampling trajectory x_t")
    _sigma_axis(ax[0, 0], "deviation from chord / chord length")
    _band(ax[0, 1], s[:-1], m["deviation_denoised"], "C1", "denoising trajectory D(x_t)")
    _sigma_axis(ax[0, 1], "deviation from chord of D outputs")
    _band(ax[1, 0], s, m["distance_to_end"], "C2", "|x_t - x_end|")
    _band(ax[1, 0], s[:-1], m["norms"]["direction"] * torch.as_tensor(s[:-1]), "C3", "sigma |d_t|")
    _sigma_axis(ax[1, 0], "distance", logy=True)
    _band(ax[1, 1], s[:-1], m["cosine"], "C4", "cos(d_t, x_t - x_end)")
    _sigma_axis(ax[1, 1], "cosine")
    for a in ax.flat:
        a.legend(fontsize=8)
    fig.suptitle(f"{title}: the boomerang (mean, 10-90% band, 4 samples)")
    png(fig, "boomerang")

    fig, ax = plt.subplots(figsize=(6, 4))
    k = torch.arange(1, m["ev_chord"].shape[1] + 1).numpy()
    for key, color, label in (("ev_chord", "C0", "chord removed"), ("ev_plain", "C1", "plain PCA"),
                              ("ev_denoised", "C2", "denoising traj., chord removed")):
        v = m[key]
        ax.fill_between(k[: v.shape[1]], v.amin(0), v.amax(0), color=color, alpha=0.25, lw=0)
        ax.plot(k[: v.shape[1]], v.mean(0), "o-", color=color, ms=3, label=f"{label} (k=2: mean {float(v[:, 1].mean()):.4f})")
    ax.axhline(0.99, color="gray", ls="--", lw=1)
    ax.set_xlabel("k principal components")
    ax.set_ylabel("explained variance (mean, min-max)")
    ax.set_ylim(min(0.5, float(m["ev_denoised"][:, 0].min())), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: explained variance vs k")
    png(fig, "explained_variance")

    fig = plt.figure(figsize=(11, 4.5))
    c = m["aligned"] / m["chord"][:, None, None]
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    for row in c:
        ax3.plot(row[:, 0], row[:, 1], row[:, 2], lw=0.6, alpha=0.6)
    ax3.set_xlabel("chord")
    ax3.set_ylabel("PC1")
    ax3.set_zlabel("PC2")
    ax3.set_title("(chord, PC1, PC2), Procrustes-aligned, / chord length", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    for row in c:
        ax2.plot(row[:, 0], row[:, 1], lw=0.6, alpha=0.6)
    ax2.plot([0, 1], [0, 0], "k--", lw=1, label="chord")
    ax2.set_xlabel("along the chord (x_T at 0, sample at 1)")
    ax2.set_ylabel("PC1")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{title}: {c.shape[0]} trajectories in 3-D")
    png(fig, "projection_3d")

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    _band(ax[0], s, m["kappa"], "C0", "curvature")
    _sigma_axis(ax[0], "curvature (1 / length)", logy=True)
    _band(ax[1], s, m["tau"].clamp_min(1e-12), "C1", "torsion")
    _sigma_axis(ax[1], "torsion (1 / length)", logy=True)
    for a in ax:
        a.legend(fontsize=8)
    fig.suptitle(f"{title}: curvature and torsion along the path (local cubic fit in arc length)")
    png(fig, "curvature")
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import schedules
    from ..data import load_dataset
    from ..denoisers.kde import KDEDenoiser
    from ..solvers import get_solver, sample
    from .._io import check_out_dir, json_bytes, publish_run, run_id, versions

    t_start = time.perf_counter()
    solver = get_solver(args.solver).name
    for name in ("num", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.window < 2:
        raise ValueError(f"--window must be >= 2, got {args.window}")
    out = check_out_dir(args.out)
    data = torch.as_tensor(load_dataset(args.data, limit=args.limit)).to(args.device)
    denoiser = KDEDenoiser(data)
    shape = tuple(data.shape[1:])
    print(f"geosample analyze: data={args.data} {tuple(data.shape)}, solver={solver}, steps={args.steps}, "
          f"num={args.num}, device={args.device}")
    dtype = getattr(torch, args.dtype)
    noise = torch.randn((args.num, *shape), generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
    noise = noise.to(args.device)
    t0 = time.perf_counter()
    traj = sample(denoiser, noise, schedules.polynomial(args.steps), solver=solver, return_trajectory=True,
                  progress=True)
    sample_s = time.perf_counter() - t0
    traj.x, traj.denoised = traj.x.cpu(), traj.denoised.cpu()

    t0 = time.perf_counter()
    m = measure(traj, window=args.window)
    numbers = {"data": args.data, "data_shape": list(data.shape), "solver": solver, "steps": args.steps,
               "schedule": "polynomial rho=7", "num": args.num, "seed": args.seed, "window": args.window, "dtype": args.dtype,
               **report(m), "sample_s": sample_s, "measure_s": time.perf_counter() - t0}
    title = f"{args.data} ({solver}, {args.steps} steps, {args.num} samples)"
    files = {f"{name}.png": blob for name, blob in figures(m, title).items()}
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
