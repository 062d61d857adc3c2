"""Is the recommended GITS search ever worse than a hand-made schedule?  Held-out noise, 5 warm-up seeds.

For each model kind (``--model``: the shipped network, or the Gaussian / class-mixture closed forms
fitted to CIFAR-10 at 16x16, built as ``nfe_quality.py`` builds them), solver and NFE, the
recommended search (``gs.gits.search(..., solver=S, gamma=GAMMAS, refine=True)``, its default 64
warm-up samples) runs once per warm-up seed, and every schedule solves the same held-out noise
(``--noise-seed``, never a warm-up draw) against the model's reference solve.  The table gives the
gain over the best hand-made schedule at that solver and NFE (EDM rho=7, logSNR, time-uniform),
``RMSE(best hand-made) / RMSE(GITS) - 1``, median and worst over the seeds, and what each search
phase cost in batches of 64 samples at that NFE (``params["calls"]``).  The teacher's run is cached
per seed (``--cache``), as a user's second search finds it: only a seed's first search pays for it.

Resumable: every finished cell is in the JSON; a rerun skips it.

    python benchmarks/gits_robust.py --model gaussian
    python benchmarks/gits_robust.py --model network --batch 256 --threads 1
    python benchmarks/gits_robust.py --model mog --num-warmup 32 --tag w32     # an ablation
    python benchmarks/gits_robust.py --model mog --ablation base,w32,r3        # their summary table
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

import geosample as gs
from geosample._io import atomic_write_text
from geosample.data import load_images, resolve
from geosample.gits.config import HANDMADE
from geosample.solvers import steps_for_nfe

sys.path.insert(0, str(Path(__file__).parent))
from nfe_quality import build_model, class_labels, machine  # noqa: E402  (the same models and references)

SOLVERS = ("euler", "ipndm", "deis", "dpmpp", "unipc", "heun")
NFES = tuple(range(3, 11))
TOLERANCE = 0.02   # "within 2% of the best hand-made schedule"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=("network", "gaussian", "mog"))
    p.add_argument("--data", default="cifar10")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--seeds", default="0,1,2,3,4", help="warm-up seeds of the search")
    p.add_argument("--batch", type=int, default=256, help="held-out samples (default 256)")
    p.add_argument("--noise-seed", type=int, default=1000, help="seed of the held-out noise (default 1000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-warmup", type=int, default=None, help="ablation: warm-up samples (default: the search's 64)")
    p.add_argument("--teacher-steps", type=int, default=60, help="ablation: teacher steps (default 60)")
    p.add_argument("--gammas", default=None, help="ablation: the gamma sweep (default gs.gits.GAMMAS)")
    p.add_argument("--refine-paths", type=int, default=None,
                   help="ablation: paths per interior point a refinement may try (default: GITSConfig's refine_paths)")
    p.add_argument("--tag", default="", help="output names gits_robust_<model>[_<tag>].*")
    p.add_argument("--ablation", default=None, help="summarise the runs of these tags (comma list) of --model into "
                   "gits_robust_<model>_ablation.md, running nothing")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "geosample-robust"),
                   help="GEOSAMPLE_CACHE for the searches (the teacher's run is shared per seed)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All CIFAR-10 training images box-downsampled to 16x16 in [-1, 1], and their classes."""
    path = resolve(name)
    images = torch.from_numpy(np.array(load_images(path))).to(torch.float32) / 127.5 - 1
    return F.avg_pool2d(images, 2), torch.from_numpy(class_labels(path))


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).pow(2).mean().sqrt())


def _cells(solvers, nfes):
    return [(s, n) for s in solvers for n in nfes if gs.SOLVERS[s].evals_per_step == 1 or n % 2 == 0]


def run(args) -> dict:
    os.environ["GEOSAMPLE_CACHE"] = args.cache
    torch.set_num_threads(args.threads)
    data, labels = _data(args.data)
    denoiser, reference, ref_name = build_model(Namespace(model=args.model, rank=None), data, labels)
    shape = tuple(data.shape[1:])
    stem = Path(args.out) / (f"gits_robust_{args.model}" + (f"_{args.tag}" if args.tag else ""))
    gammas = tuple(float(g) for g in args.gammas.split(",")) if args.gammas else gs.gits.GAMMAS
    ablation = {k: v for k, v in (("num_warmup", args.num_warmup), ("teacher_steps", args.teacher_steps),
                                  ("refine_paths", args.refine_paths)) if v is not None}
    report = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    if report.get("noise_seed") != args.noise_seed or report.get("batch") != args.batch:
        report = {"model": args.model, "reference": ref_name, "batch": args.batch, "noise_seed": args.noise_seed,
                  "tolerance": TOLERANCE, "handmade": {}, "gits": {}}
    report["search"] = {**ablation, "gammas": list(gammas)}
    report["machine"] = machine()
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(args.noise_seed))
    saved = Path(args.cache) / f"reference-{args.model}-{args.noise_seed}-{args.batch}.pt"   # solved once per model
    if saved.exists():
        ref = torch.load(saved)
    else:
        t0 = time.perf_counter()
        ref = reference(noise)
        report["reference_s"] = time.perf_counter() - t0
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref, saved)
    seeds = [int(v) for v in args.seeds.split(",")]
    cells = _cells(args.solvers.split(","), [int(v) for v in args.nfes.split(",")])
    for solver, nfe in tqdm(cells, desc=f"robust[{args.model}]"):
        steps = steps_for_nfe(solver, nfe)
        cell = f"{solver}/{nfe}"
        if cell not in report["handmade"]:
            report["handmade"][cell] = {name: _rmse(gs.sample(denoiser, noise, gs.schedules.by_name(name, steps),
                                                              solver=solver), ref) for name in HANDMADE}
        for seed in seeds:
            if f"{seed}" in report["gits"].setdefault(cell, {}):
                continue
            t0 = time.perf_counter()
            found = gs.gits.search(denoiser, shape, steps, solver=solver, gamma=gammas, refine=True, seed=seed,
                                   **ablation)
            took = time.perf_counter() - t0
            report["gits"][cell][f"{seed}"] = {
                "rmse": _rmse(gs.sample(denoiser, noise, found.sigmas, solver=solver), ref), "search_s": took,
                "sigmas": found.sigmas.tolist(), "selected": found.params["selected"], "calls": found.params["calls"],
                "teacher_calls": found.params["num_warmup"] * gs.nfe("ipndm", args.teacher_steps)}
            atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    return report


def summary(report: dict) -> list[dict]:
    """Per cell: best hand-made, GITS RMSEs over seeds, gains, cost per phase in batches of 64."""
    rows = []
    for cell, seeds in report["gits"].items():
        solver, nfe = cell.split("/")
        hm = report["handmade"][cell]
        best_name = min(hm, key=hm.get)
        rmses = [r["rmse"] for r in seeds.values()]
        gains = [hm[best_name] / v - 1 for v in rmses]
        batch = 64 * int(nfe)
        phase = {k: statistics.median(r["calls"].get(k, 0) for r in seeds.values()) / batch
                 for k in ("candidates", "refinement", "check")}
        teacher = statistics.median(r["teacher_calls"] for r in seeds.values()) / batch
        rows.append({"solver": solver, "nfe": int(nfe), "best": best_name, "best_rmse": hm[best_name],
                     "gits": rmses, "gain_median": statistics.median(gains), "gain_worst": min(gains),
                     "within": sum(g >= -report["tolerance"] for g in gains), "seeds": len(gains),
                     "picked_handmade": sum(r["selected"] in HANDMADE for r in seeds.values()),
                     "teacher": teacher, **phase, "total": teacher + sum(phase.values()),
                     "search_s": statistics.median(r["search_s"] for r in seeds.values())})
    return rows


def markdown(report: dict) -> str:
    rows = summary(report)
    m = report["machine"]
    lines = [f"# Recommended GITS search vs the best hand-made schedule: {report['model']}", "",
             f"{m['date']}, {m['platform']}, torch {m['torch']}, {m['torch_threads']} thread(s), geosample "
             f"{m['geosample']}. Search settings: {report['search']}. Held-out noise: {report['batch']} samples (seed {report['noise_seed']}), RMSE to "
             f"the reference ({report['reference']}). Search: `gs.gits.search(..., solver=S, gamma=GAMMAS, "
             f"refine=True, seed=s)` for warm-up seeds s = {', '.join(next(iter(report['gits'].values())))}. "
             "Gain = RMSE(best hand-made) / RMSE(GITS) - 1 (positive: GITS better); best hand-made = the lowest of "
             f"{', '.join(HANDMADE)} at that solver and NFE on the same held-out noise.", "",
             "| solver | NFE | best hand-made (RMSE) | GITS RMSE median [min, max] | gain median | gain worst | "
             f"seeds within {report['tolerance']:.0%} | hand-made picked |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gits"]
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['best']} ({r['best_rmse']:.4f}) | {statistics.median(g):.4f} "
                     f"[{min(g):.4f}, {max(g):.4f}] | {r['gain_median']:+.1%} | {r['gain_worst']:+.1%} | "
                     f"{r['within']}/{r['seeds']} | {r['picked_handmade']}/{r['seeds']} |")
    worst = min(rows, key=lambda r: r["gain_worst"])
    lines += ["", f"Cells: {len(rows)}; every seed within {report['tolerance']:.0%} in "
              f"{sum(r['within'] == r['seeds'] for r in rows)}; worst: {worst['solver']} NFE {worst['nfe']} "
              f"{worst['gain_worst']:+.1%}.", "",
              "Cost of one search in batches of 64 samples at the target NFE (medians over seeds; the teacher "
              "is paid once per model and warm-up seed, then cached for every solver and NFE):", "",
              "| solver | NFE | teacher | candidates | refinement | check | total without the teacher | search s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rest = r["candidates"] + r["refinement"] + r["check"]
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['teacher']:.1f} | {r['candidates']:.1f} | "
                     f"{r['refinement']:.1f} | {r['check']:.1f} | {rest:.1f} | {r['search_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _settings(search: dict) -> str:
    """A run's search settings in short: warm-up samples, teacher steps, gammas, refine paths."""
    defaults = gs.gits.GITSConfig(refine=True)
    warmup = search.get("num_warmup") or defaults.num_warmup
    refine = search.get("refine_paths") or defaults.refine_paths
    return f"w {warmup}, t {search['teacher_steps']}, {len(search['gammas'])} gammas, r {refine}"


def ablation(model: str, tags: list[str], out: Path) -> str:
    """One row per tagged run of ``model``: its settings, cells with every seed within the tolerance,
    the worst and median gain, and the median cost per phase in batches of 64 at the target NFE."""
    lines = [f"# Ablation of the recommended GITS search: {model}", "",
             "Each row is one run of `benchmarks/gits_robust.py` with the settings shown (the rest as the "
             "library's defaults); gains over the best hand-made schedule on held-out noise, costs in "
             "batches of 64 samples at the target NFE (medians over cells and seeds).", "",
             "| run | settings | cells all within 2% | worst gain | median gain | teacher | candidates | refinement "
             "| check | total |", "|---|---|---|---|---|---|---|---|---|---|"]
    for tag in tags:
        report = json.loads((out / f"gits_robust_{model}_{tag}.json").read_text())
        rows = summary(report)
        med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
        lines.append(f"| {tag} | {_settings(report['search'])} | {sum(r['within'] == r['seeds'] for r in rows)}/{len(rows)} | "
                     f"{min(r['gain_worst'] for r in rows):+.1%} | {med('gain_median'):+.1%} | {med('teacher'):.1f} | "
                     f"{med('candidates'):.1f} | {med('refinement'):.1f} | {med('check'):.1f} | {med('total'):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.ablation:
        text = ablation(args.model, args.ablation.split(","), Path(args.out))
        atomic_write_text(Path(args.out) / f"gits_robust_{args.model}_ablation.md", text)
        print(text)
        return
    report = run(args)
    atomic_write_text(Path(args.out) / (f"gits_robust_{args.model}" + (f"_{args.tag}" if args.tag else "") + ".md"),
                      markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
