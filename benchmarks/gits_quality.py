"""GITS vs the EDM (polynomial rho=7) schedule: RMSE to a 500-NFE reference solve on a KDE denoiser.

    python benchmarks/gits_quality.py --data digits
    python benchmarks/gits_quality.py --data cifar10 --limit 5000 --num-eval 64

For each solver (iPNDM, Euler) and step count (4, 5, 6, 8, 10): one GITS search (teacher iPNDM on
61 polynomial points, dev metric, gamma 1.15, 256 warm-up samples, seed 0; the cost matrix is
computed once and shared through the cache), the same search with the gamma picked from
``gs.gits.GAMMAS`` by each solver's own error to the teacher, and the RMSE of every schedule's
samples to a Heun solve with 250 steps (500 NFE) from the same noise (seed 1000, disjoint from the
search noise).
Writes benchmarks/results/gits_quality_<data>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

import geosample as gs
from geosample.data import load_dataset
from geosample._io import atomic_write_text
from geosample.denoisers.kde import KDEDenoiser

SOLVERS = ("ipndm", "euler")
STEPS = (4, 5, 6, 8, 10)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMSE pooled over all samples and pixels (sqrt of the mean squared error)."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--limit", type=int, default=None, help="use a seeded random subset of LIMIT training images")
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--num-warmup", type=int, default=256)
    ap.add_argument("--name", default=None, help="output names gits_quality_NAME.* (default: the dataset's name)")
    ap.add_argument("--gammas", type=lambda t: [float(v) for v in t.split(",")], default=None,
                    help="comma list to pick gamma from (default: gs.gits.GAMMAS, 0.8 to 1.3)")
    args = ap.parse_args()

    gammas = args.gammas or list(gs.gits.GAMMAS)
    data = load_dataset(args.data, limit=args.limit)
    den = KDEDenoiser(data)
    shape = tuple(data.shape[1:])
    noise = torch.randn((args.num_eval, *shape), generator=torch.Generator().manual_seed(1000))
    t0 = time.perf_counter()
    ref = gs.sample(den, noise, gs.schedules.polynomial(250), solver="heun", progress=True)
    t_ref = time.perf_counter() - t0
    rows, t_search = [], 0.0
    for steps in STEPS:
        t0 = time.perf_counter()
        sched = gs.gits.search(den, shape, steps, num_warmup=args.num_warmup, progress=True)
        t_search += time.perf_counter() - t0
        edm = gs.schedules.polynomial(steps)
        for solver in SOLVERS:
            t0 = time.perf_counter()
            picked = gs.gits.search(den, shape, steps, num_warmup=args.num_warmup, gamma=gammas,
                                    solver=solver, progress=True)
            t_search += time.perf_counter() - t0
            e = rmse(gs.sample(den, noise, edm, solver=solver), ref)
            g = rmse(gs.sample(den, noise, sched.sigmas, solver=solver), ref)
            p = rmse(gs.sample(den, noise, picked.sigmas, solver=solver), ref)
            rows.append({"solver": solver, "steps": steps, "nfe": steps, "rmse_edm": e, "rmse_gits": g,
                         "gits_indices": sched.indices, "rmse_gits_picked": p,
                         "picked_gamma": picked.gamma, "picked_indices": picked.indices})
            print(rows[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "data": args.data, "n_data": int(data.shape[0]),
            "num_eval": args.num_eval, "num_warmup": args.num_warmup, "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "reference": "heun, polynomial rho=7, 250 steps (500 NFE)", "reference_s": t_ref,
            "search_s_total": t_search,
            "command": "python benchmarks/gits_quality.py " + " ".join(
                f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if v is not None)}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = f"gits_quality_{args.name or Path(str(args.data)).stem}"
    atomic_write_text(out / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# GITS vs EDM rho=7: RMSE to a 500-NFE solve ({args.data}, {meta['n_data']} images, "
             f"{args.num_eval} samples, {meta['date']})", "", f"`{meta['command']}`", "",
             "GITS: gamma 1.15 (the reference's); GITS picked: gamma picked from a sweep by the solver's "
             f"error to the teacher on the warm-up noise (`gamma={gammas}`).", "",
             "| solver | steps (NFE) | EDM rho=7 | GITS | GITS / EDM | GITS picked | picked / EDM | picked gamma "
             "| GITS indices | picked indices |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['rmse_edm']:.4f} | {r['rmse_gits']:.4f} | "
                     f"{r['rmse_gits'] / r['rmse_edm']:.2f} | {r['rmse_gits_picked']:.4f} | "
                     f"{r['rmse_gits_picked'] / r['rmse_edm']:.2f} | {r['picked_gamma']} | {r['gits_indices']} | "
                     f"{r['picked_indices']} |")
    for key in ("rmse_gits", "rmse_gits_picked"):
        ratios = [r[key] / r["rmse_edm"] for r in rows]
        lines.append(f"\n{key}: mean ratio to EDM {sum(ratios) / len(ratios):.2f}, worse than EDM in "
                     f"{sum(q > 1 for q in ratios)} of {len(ratios)} cells.")
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
