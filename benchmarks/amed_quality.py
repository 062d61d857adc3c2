"""AMED on the shipped network: AMED-Solver and the AMED-Plugin (iPNDM, DPM-Solver++) against the best
non-learned cell at each NFE, RMSE to the converged solve on held-out noise.

Setup (the same as ``nfe_quality.py --model network --gamma sweep --refine``, whose table names the best
non-learned cell per NFE): 64 samples from noise seed 1, reference Heun 100 steps (199 NFE) on EDM's
schedule, RMSE = root of the mean squared error over samples and pixels.  The best non-learned cell
(solver x schedule, GITS with the recommended search: gamma sweep + refine, 64 warm-up samples from
seed 0) is recomputed here in the same process.

AMED: K intervals and AFS for odd NFE (NFE = 2K - afs).  Base grids: "polynomial" (EDM rho=7, the
paper's for the plugins), "time_uniform" (the paper's for AMED-Solver), "gits" (the even points of
the GITS schedule of 2K steps searched for the base solver, iPNDM's for AMED-Solver, and its odd
points as the starting intermediate times).  Training (``gs.amed.train``): the teacher is iPNDM on
the 60-step polynomial grid (GITS's fine grid; one run on noise seed 0, the GITS warm-up stream,
shared by every base grid it contains; time_uniform grids get their own), ``--num-samples`` noises,
``--epochs``; never the scored noise.  Per cell: the learned predictor (per sample), its mean
predictions (what a diffusers pipeline runs), and the untrained start.  ``--bases`` picks base grids.
Studies at one setting (``--studies``): predictor features, teacher, training-set size; and
"budget", the default ``gs.amed.train`` timed alone.

Resumable: every finished cell is saved in ``--work``; run it again (e.g. under ``flock``) to go on;
``--max-minutes`` stops after the cell that passes the limit.  Writes ``amed_network.json`` / ``.md``.

    flock /work/heavy.lock python benchmarks/amed_quality.py --max-minutes 25
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

import geosample as gs
from geosample._io import atomic_write, atomic_write_text

NFES = (3, 4, 5, 6, 8)
METHODS = ("amed", "ipndm", "dpmpp")
BASES = {"amed": ("time_uniform", "gits"), "ipndm": ("polynomial", "gits"), "dpmpp": ("polynomial", "gits")}
STUDY = {"nfe": 5, "method": "ipndm", "base": "gits"}
TEACHER = {"solver": "ipndm", "steps": 60, "samples": 256}   # the shared teacher; cells use its first samples
STUDIES = {"loss/interval": {"loss": "interval"}, "features/denoised": {"features": "denoised"},
           "features/none": {"features": "none"}, "samples/64": {"num_samples": 64},
           "samples/256": {"num_samples": 256}, "samples/256x2": {"num_samples": 256, "epochs": 8},
           "teacher/heun-M1": {"teacher": None, "teacher_solver": "heun", "teacher_steps": 2 * 3},
           "scale/0.1": {"scale_dir": 0.1, "scale_time": 0.1}}   # one setting changed against the STUDY cell


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--bases", default="time_uniform,polynomial,gits",
                   help="base grids to train on (each method takes those of its own it names)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="GITS warm-up and AMED training noise; scored noise is seed + 1")
    p.add_argument("--num-warmup", type=int, default=64, help="GITS teacher samples (default 64, as nfe_quality)")
    p.add_argument("--num-samples", type=int, default=128, help="AMED teacher trajectories (default 128)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--loss", default="trajectory", choices=("interval", "trajectory"))
    p.add_argument("--features", default="auto")
    p.add_argument("--batch-size", type=int, default=16, help="AMED training batch (default 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "geosample" / "amed-bench"),
                   help="resumable state (tensors and finished cells), outside the repository")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--report-only", action="store_true", help="write the report from the cells in --work, run nothing")
    p.add_argument("--studies", default=",".join((*STUDIES, "budget")),
                   help="studies to run after the cells, and 'budget' (the default gs.amed.train timed); '' for none")
    return p.parse_args(argv)


class State:
    """Finished cells and tensors in ``work``, written atomically as they finish."""

    def __init__(self, work: Path, config: dict):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "cells.json"
        self.cells = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.cells.get("_config", config) != config:
            raise SystemExit(f"{self.path} holds cells of other settings; pass another --work or delete it")
        self.cells["_config"] = config

    def get(self, key):
        return self.cells.get(key)

    def put(self, key, value):
        self.cells[key] = value
        atomic_write_text(self.path, json.dumps(self.cells, indent=1))
        return value

    def tensor(self, name, make):
        path = self.work / f"{name}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        t = make()
        atomic_write(path, lambda f: torch.save(t, f))
        return t


def rmse(x, ref) -> float:
    return math.sqrt(float((x.double() - ref.double()).pow(2).mean()))


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "geosample": gs.__version__,
            "date": date.today().isoformat(), "load_at_start": os.getloadavg()[0],
            "note": "2 CPU cores shared with other jobs: times are noisy"}


def best_nonlearned(nfe: int) -> dict:
    """The best (solver, schedule) at ``nfe`` in nfe_quality's recommended-search table."""
    path = Path(__file__).parent / "results" / "nfe_quality_network_refine.json"
    rows = [r for r in json.loads(path.read_text())["results"] if r["nfe"] == nfe]
    best = min(rows, key=lambda r: r["rmse"])
    return {"solver": best["solver"], "schedule": best["schedule"], "rmse_recorded": best["rmse"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    bases, studies = args.bases.split(","), [name for name in args.studies.split(",") if name]
    if not set(bases) <= {b for m in BASES.values() for b in m}:
        raise SystemExit(f"--bases: choose from time_uniform, polynomial, gits; got {args.bases!r}")
    if not set(studies) <= {*STUDIES, "budget"}:
        raise SystemExit(f"--studies: choose from {', '.join((*STUDIES, 'budget'))}; got {args.studies!r}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GEOSAMPLE_CACHE", str(Path(args.work) / "cache"))
    settings = {k: getattr(args, k) for k in ("batch", "seed", "num_warmup", "num_samples", "epochs", "lr",
                                              "batch_size", "loss", "features")}
    state = State(Path(args.work), settings)
    nfes, methods = [int(v) for v in args.nfes.split(",")], args.methods.split(",")
    if args.report_only:
        write_report(state, args, nfes, methods)
        return 0
    deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
    net = gs.models.load("cifar10-tiny")
    shape = net.shape
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(args.seed + 1))

    def timed(make):
        t0, c0 = time.perf_counter(), time.process_time()
        out = make()
        return out, time.perf_counter() - t0, time.process_time() - c0

    ref = state.tensor("reference", lambda: gs.metrics.reference_solve(net, noise, 100, "heun", progress=True))
    teacher_x = state.tensor("teacher", lambda: _teacher(net, shape, args, state))
    fine = gs.schedules.polynomial(TEACHER["steps"])
    teacher = gs.Trajectory(x=teacher_x, denoised=teacher_x[:0], sigmas=fine, nfe=TEACHER["steps"], solver="ipndm")

    def gits(solver: str, steps: int) -> list:
        key = f"gits/{solver}/{steps}"
        if state.get(key) is None:
            found, secs, _ = timed(lambda: gs.gits.search(net, shape, steps, gamma=gs.gits.GAMMAS, refine=True,
                                                       num_warmup=args.num_warmup, seed=args.seed, solver=solver,
                                                       use_cache=False))
            state.put(key, {"sigmas": found.sigmas.tolist(), "gamma": found.gamma, "search_s": secs})
        return state.get(key)["sigmas"]

    def out_of_time() -> bool:
        if deadline is not None and time.time() > deadline:
            print(f"stopping after --max-minutes {args.max_minutes}; run again to go on")
            return True
        return False

    for nfe in nfes:   # the best non-learned cell, recomputed, and the GITS cells AMED starts from
        key = f"baseline/{nfe}"
        if state.get(key) is None:
            recorded = best_nonlearned(nfe)
            cands = [(recorded["solver"], recorded["schedule"])]
            cands += [(s, "gits") for s in ("ipndm", "dpmpp") if nfe % 2 == 0 and (s, "gits") not in cands]
            rows = []
            for solver, schedule in cands:
                steps = gs.solvers.steps_for_nfe(solver, nfe)
                sig = gits(solver, steps) if schedule == "gits" else gs.schedules.by_name(schedule, steps).tolist()
                x = gs.sample(net, noise, sig, solver=solver)
                rows.append({"solver": solver, "schedule": schedule, "sigmas": sig, "rmse": rmse(x, ref)})
            best = min(rows, key=lambda r: r["rmse"])
            state.put(key, {**best, "nfe": nfe, "recorded": recorded, "candidates": rows})
        if out_of_time():
            return 0

    def cell(nfe, method, base, **train_options):
        afs = nfe % 2 == 1
        K = gs.solvers.steps_for_nfe(method, nfe, afs=afs, amed=True)
        init = None
        if base == "gits":
            s = gits("ipndm" if method == "amed" else method, 2 * K)
            sig = s[::2]
            init = gs.amed.Fixed([math.log(s[2 * i + 1] / s[2 * i]) / math.log(s[2 * i + 2] / s[2 * i])
                                  for i in range(K)])
        else:
            sig = gs.schedules.by_name(base, K).tolist()
        contained = all(any(abs(f - v) <= 1e-9 * v for f in fine.tolist()) for v in sig)
        options = {"teacher": teacher if contained else None, "num_samples": args.num_samples,
                   "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                   "loss": args.loss, "features": args.features, **train_options}
        if options.get("teacher") is not None and options["num_samples"] < teacher.x.shape[1]:
            n = options["num_samples"]
            options["teacher"] = gs.Trajectory(x=teacher.x[:, :n], denoised=teacher.x[:0], sigmas=fine,
                                               nfe=teacher.nfe)
        pred, secs, cpu = timed(lambda: gs.amed.train(net, shape, sig, solver=method, afs=afs, init=init, **options))
        start = init or gs.amed.Fixed([0.5] * K)
        runs = {"learned": pred, "mean": pred.fixed(), "start": start}
        res = {name: rmse(gs.sample(net, noise, sig, solver=method, afs=afs, amed=p), ref) for name, p in runs.items()}
        return {"nfe": nfe, "method": method, "base": base, "afs": afs, "K": K, "sigmas": sig,
                "features": pred.features, "rmse": res["learned"], "rmse_mean": res["mean"], "rmse_start": res["start"],
                "train_s": secs, "train_cpu_s": cpu, "load": os.getloadavg()[0], "teacher": "shared" if contained else "own",
                "training": {k: pred.meta["training"][k] for k in ("loss", "denoiser_calls", "num_samples", "gradient")},
                "mean": pred.meta["mean"], "options": {k: v for k, v in train_options.items()}}

    todo = [(nfe, m, b) for nfe in nfes for m in methods for b in bases if b in BASES[m]]   # in --bases order
    for nfe, method, base in todo:
        key = f"amed/{nfe}/{method}/{base}"
        if state.get(key) is None:
            state.put(key, cell(nfe, method, base))
            print(json.dumps({k: state.get(key)[k] for k in ("nfe", "method", "base", "rmse", "rmse_start", "train_s")}))
        if out_of_time():
            return 0

    for name in (n for n in STUDIES if n in studies):
        key = f"study/{name}"
        if state.get(key) is None:
            state.put(key, cell(STUDY["nfe"], STUDY["method"], STUDY["base"], **STUDIES[name]))
            print(key, state.get(key)["rmse"])
        if out_of_time():
            return 0
    if "budget" in studies:
        key = "budget/default"
        if state.get(key) is None:   # gs.amed.train with its defaults, alone (own teacher, no cache)
            sig = gs.schedules.polynomial(3)
            pred, secs, cpu = timed(lambda: gs.amed.train(net, shape, sig, solver="ipndm", use_cache=False,
                                                          progress=True))
            state.put(key, {"seconds": secs, "cpu_seconds": cpu, "load": os.getloadavg()[0], "threads": torch.get_num_threads(),
                            "rmse": rmse(gs.sample(net, noise, sig, solver="ipndm", amed=pred), ref),
                            "denoiser_calls": pred.meta["training"]["denoiser_calls"]})

    write_report(state, args, nfes, methods)
    return 0


def _teacher(net, shape, args, state) -> torch.Tensor:
    """iPNDM on the 60-step polynomial grid from the GITS warm-up stream (seed --seed), [61, 256, ...]."""
    gen = torch.Generator().manual_seed(args.seed)
    xs, t0 = [], time.perf_counter()
    fine = gs.schedules.polynomial(TEACHER["steps"])
    for start in range(0, TEACHER["samples"], 64):   # rounds of 64, as the GITS warm-up draws them
        noise = torch.randn((min(64, TEACHER["samples"] - start), *shape), generator=gen)
        xs.append(gs.sample(net, noise, fine, solver=TEACHER["solver"], return_trajectory=True).x)
    state.put("teacher_s", time.perf_counter() - t0)
    return torch.cat(xs, dim=1)


def _cost(c: dict) -> str:
    """Training wall seconds, with CPU seconds and the load average where the cell recorded them."""
    extra = f" ({c['train_cpu_s']:.0f}, {c['load']:.1f})" if "train_cpu_s" in c else ""
    return f"{c['train_s']:.0f}{extra}"


def write_report(state: State, args, nfes, methods) -> None:
    cells = state.cells
    rows = []
    for nfe in nfes:
        base = cells.get(f"baseline/{nfe}")
        amed = [cells[k] for k in cells if k.startswith(f"amed/{nfe}/")]
        if base is None or not amed:
            continue
        best = {m: min((c for c in amed if c["method"] == m), key=lambda c: c["rmse"], default=None) for m in methods}
        rows.append((nfe, base, best))
    stem = Path(args.out) / "amed_network"
    report = {"cells": cells, "machine": machine(), "command": "python " + " ".join(sys.argv)}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    name = {"amed": "AMED-Solver", "ipndm": "AMED-Plugin iPNDM", "dpmpp": "AMED-Plugin DPM-Solver++"}
    lines = [f"### AMED on cifar10-tiny, {args.batch} held-out samples (noise seed {args.seed + 1})", "",
             "RMSE to the converged solve (Heun, 100 steps, 199 NFE). Best non-learned: the best of the best "
             "solver x schedule cell of `nfe_quality_network_refine` (recomputed here with the current recommended "
             "GITS search, 64 warm-up samples) and, at even NFE, iPNDM and DPM-Solver++ on their GITS schedules. "
             "AMED: the best base grid per method (in brackets), trained with "
             f"{args.num_samples} teacher trajectories, {args.epochs} epochs; the change against the best "
             "non-learned cell in parentheses (negative: AMED better).", "",
             "| NFE | best non-learned | " + " | ".join(name[m] for m in methods) + " | training s (each) |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for nfe, base, best in rows:
        cells_md = []
        for m in methods:
            c = best[m]
            cells_md.append("" if c is None else
                            f"{c['rmse']:.4f} ({100 * (c['rmse'] / base['rmse'] - 1):+.0f}%) [{c['base']}]")
        secs = [f"{best[m]['train_s']:.0f}" for m in methods if best[m] is not None]
        lines.append(f"| {nfe} | {base['rmse']:.4f} {base['solver']}/{base['schedule']} | " + " | ".join(cells_md)
                     + f" | {', '.join(secs)} |")
    lines += ["", "Every cell: learned (per sample) / its mean predictions (a diffusers pipeline) / the untrained "
              "start (r = 1/2, or the GITS midpoints for the gits base):", "",
              "| NFE | method | base | RMSE learned | mean | start | training s (CPU s, load) | teacher |",
              "|---|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in cells if k.startswith("amed/")):
        c = cells[key]
        lines.append(f"| {c['nfe']} | {name[c['method']]} | {c['base']} | {c['rmse']:.4f} | {c['rmse_mean']:.4f} | "
                     f"{c['rmse_start']:.4f} | {_cost(c)} | {c['teacher']} |")
    studies = sorted(k for k in cells if k.startswith("study/"))
    if studies:
        main = cells.get(f"amed/{STUDY['nfe']}/{STUDY['method']}/{STUDY['base']}")
        lines += ["", f"Studies at NFE {STUDY['nfe']}, {name[STUDY['method']]}, {STUDY['base']} base (as the main "
                  f"cells: {args.features} features, {args.loss} loss, {args.num_samples} samples, the shared iPNDM "
                  "60-step teacher; one setting changed per row):", "",
                  "| study | RMSE learned | mean | start | training s (CPU s, load) |", "|---|---|---|---|---|"]
        if main is not None:
            lines.append(f"| (main cell) | {main['rmse']:.4f} | {main['rmse_mean']:.4f} | {main['rmse_start']:.4f} | "
                         f"{_cost(main)} |")
        for key in studies:
            c = cells[key]
            lines.append(f"| {key[6:]} | {c['rmse']:.4f} | {c['rmse_mean']:.4f} | {c['rmse_start']:.4f} | {_cost(c)} |")
    if "budget/default" in cells:
        b = cells["budget/default"]
        lines += ["", f"`gs.amed.train(net, net.shape, gs.schedules.polynomial(3), solver='ipndm')` with its defaults "
                  f"(own teacher, {b['denoiser_calls']} batched denoiser calls): {b['seconds']:.0f} s wall, "
                  f"{b['cpu_seconds']:.0f} s CPU on {b['threads']} threads, load {b['load']:.1f} at the end "
                  f"(budget: 600 s on 2 cores); RMSE {b['rmse']:.4f}."]
    m = report["machine"]
    lines += ["", "Settings of every cell (the runs that made them resume from one --work folder): "
              + ", ".join(f"{k}={v}" for k, v in cells["_config"].items()) + "."]
    lines += ["", f"Command: `{report['command']}` ({m['date']}, {m['cpus']} shared CPU cores, {m['torch_threads']} "
              f"torch threads, torch {m['torch']}, geosample {m['geosample']})."]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
