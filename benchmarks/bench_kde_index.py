"""The KDE index (geosample/denoisers/kde_index.py) against the full streaming pass.

``pytest benchmarks/bench_kde_index.py`` (CI): a tiny problem.  ``python benchmarks/bench_kde_index.py
[--n 50000,200000,1000000]`` measures on CIFAR-10 x 20 seeded shifts/flips (N up to 1,000,000,
D = 3072, uint8 memmap built by benchmarks/make_cifar_x20.py outside the repo), B = 16 queries
= data rows plus sigma-scaled noise, at the sigmas of a 10-step EDM schedule plus 0.5, 0.2, 0.05, 0.01:

- per sigma, the indexed call's time over the same call without the index (the full streaming
  pass, in the same process), the paths taken and the certified set sizes;
- the index build time (one subsample + one pass) and the denoiser's own setup (two passes);
- resident memory (RssAnon: the process's own pages; memmapped file pages are the OS's cache);
- exactness against the float64 reference (backend="reference") on a few queries per sigma.

Writes benchmarks/results/kde_index.{json,md} and kde_index_nsweep.png (kde_index_r<rank>.* with --rank).  ``--ranks 32,64,128,256``
instead records the certified set sizes by index rank at the first N (kde_index_rank.{json,md}).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

import geosample as gs
from geosample import schedules
from geosample._io import atomic_write_text
from geosample.denoisers.kde import KDEDenoiser, Query
from geosample.denoisers.kde_index import INDEXED, KDEIndex

sys.path.insert(0, str(Path(__file__).parent))
from make_cifar_x20 import build as build_dataset, default_path  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIGMAS = sorted(set(schedules.polynomial(10).tolist()) | {0.5, 0.2, 0.05, 0.01}, reverse=True)
B = 16


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def queries(kd: KDEDenoiser, sigma: float, b: int = B, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, kd.store.n, (b,), generator=g)
    y = kd.store.gather64(idx).float()
    return (y + sigma * torch.randn(y.shape, generator=g)).reshape(b, *kd.shape)


def timed(f, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def rel_err(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def run_n(data, n: int, exact_q: int, rank: int) -> dict:
    y = data[:n]
    t_setup, kd = timed(lambda: KDEDenoiser(y, chunk_size=4096))
    mem0 = rss_anon_mb()
    t_build, index = timed(lambda: KDEIndex.build(kd.store, rank=rank, cache=False))
    mem_index = rss_anon_mb() - mem0
    ref = KDEDenoiser.__new__(KDEDenoiser)
    ref.__dict__.update(kd.__dict__, backend="reference", index=None)
    rows, t_full = [], {}
    for s in SIGMAS:
        x = queries(kd, s)
        t_full[s] = t = math.inf
        for _ in range(2):                              # interleaved, best of two: the same load on both
            kd.index = None
            t_full[s] = min(t_full[s], timed(lambda: kd(x, s))[0])
            kd.index = index
            t_i, (out, st) = timed(lambda: kd(x, s, return_stats=True))
            t = min(t, t_i)
        q = Query.prepare(kd.store, x.reshape(B, -1).double(), torch.full((B,), s, dtype=torch.float64) ** -2)
        gap = 2.0 * np.log(n / index.tol) / q.inv_s2
        t_cert, (_, cols, big) = timed(lambda: index.certify(kd.store, q, gap), repeat=2)
        sizes = torch.bincount(cols, minlength=B).double()
        err = rel_err(out[:exact_q], ref(x[:exact_q], s)) if exact_q else None
        rows.append(dict(sigma=s, time_s=t, ratio=t / t_full[s], certify_ratio=t_cert / t_full[s],
                         indexed=int((st.path == INDEXED).sum()),
                         set_mean=float(sizes[~big].mean()) if (~big).any() else None,
                         set_max=int(sizes[~big].max()) if (~big).any() else None,
                         over_cap=int(big.sum()), err=err))
        print(n, rows[-1], flush=True)
    full = float(np.median(list(t_full.values())))
    return dict(n=n, setup_s=t_setup, build_s=t_build, full_pass_s=full, full_pass_by_sigma=t_full,
                index_mb=index.vecs.numel() * 4 / 2 ** 20, rss_anon_index_mb=mem_index,
                rss_anon_mb=rss_anon_mb(), maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                rank=index.rank, rows=rows)


def rank_sweep(data, n: int, ranks: list[int], sigmas=(0.2, 0.318, 0.5, 0.7)) -> dict:
    """Certified set sizes (every query certified, no cap) by index rank, and the build time."""
    kd = KDEDenoiser(data[:n], chunk_size=4096)
    out = []
    for r in ranks:
        t_build, index = timed(lambda: KDEIndex.build(kd.store, rank=r, cache=False, max_fraction=1.0))
        for s in sigmas:
            x = queries(kd, s)
            q = Query.prepare(kd.store, x.reshape(B, -1).double(), torch.full((B,), s, dtype=torch.float64) ** -2)
            _, cols, _ = index.certify(kd.store, q, 2.0 * np.log(n / index.tol) / q.inv_s2)
            sizes = torch.bincount(cols, minlength=B).double()
            out.append(dict(rank=r, sigma=s, build_s=t_build, set_mean=float(sizes.mean()), set_max=int(sizes.max())))
            print(out[-1], flush=True)
    return dict(n=n, rows=out)


def write_ranks(res: dict, meta: dict):
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "kde_index_rank.json", json.dumps(dict(meta=meta, **res), indent=1))
    lines = ["# KDE index: certified set size by rank", "",
             f"N = {res['n']:,} rows of CIFAR-10 x 20 (uint8 memmap), B = {B} queries = data rows + sigma noise, "
             "every query certified (no cap); mean / max rows per certified set.  "
             f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}.", "",
             "| rank | index bytes / row | build s | " + " | ".join(f"sigma {s:g}" for s in sorted({w['sigma'] for w in res['rows']})) + " |",
             "|---|---|---|" + "---|" * len({w["sigma"] for w in res["rows"]})]
    for r in sorted({w["rank"] for w in res["rows"]}):
        ws = sorted((w for w in res["rows"] if w["rank"] == r), key=lambda w: w["sigma"])
        lines.append(f"| {r} | {4 * (r + 7)} | {ws[0]['build_s']:.2f} | "
                     + " | ".join(f"{w['set_mean']:.1f} / {w['set_max']}" for w in ws) + " |")
    atomic_write_text(RESULTS / "kde_index_rank.md", "\n".join(lines) + "\n")


def meta_info() -> dict:
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=f"{platform.machine()}, {os.cpu_count()} cores (a shared VM)",
                torch=torch.__version__, threads=torch.get_num_threads(), batch=B)


def write(results: list[dict], name: str = "kde_index"):
    RESULTS.mkdir(exist_ok=True)
    meta = meta_info()
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(dict(meta=meta, runs=results), indent=1))
    lines = ["# KDE index: certified sets vs the full streaming pass", "",
             f"CIFAR-10 x 20 seeded shifts/flips (uint8 memmap), D = 3072, B = {B} queries = data rows + sigma "
             "noise; ratio = indexed call / the same call without the index (the full pass) on the same "
             "queries, interleaved, best of two each, same process; full pass = the median over the sigmas; "
             "index work = the certification alone (the pass over the index, the sets from its kept bounds, the probe re-scoring: "
             "the whole overhead of a query that then takes the full pass).  Machine: "
             f"{meta['machine']}; times are noisy, ratios (interleaved) less so.  "
             f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads.", ""]
    for r in results:
        lines += [f"## N = {r['n']:,}", "",
                  f"full pass {r['full_pass_s']:.2f} s; index build {r['build_s']:.1f} s "
                  f"(= {r['build_s'] / r['full_pass_s']:.1f} full passes; the denoiser's own setup "
                  f"{r['setup_s']:.1f} s); index {r['index_mb']:.0f} MB (rank {r['rank']}); RssAnon "
                  f"{r['rss_anon_mb']:.0f} MB, peak RSS incl. mapped file pages {r['maxrss_mb']:.0f} MB", "",
                  "| sigma | time s | x full pass | index work x full pass | queries indexed | set mean | set max | sets > cap | rel err vs float64 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for w in r["rows"]:
            fmt = lambda v, f: "-" if v is None else format(v, f)
            lines.append(f"| {w['sigma']:.3g} | {w['time_s']:.3f} | {w['ratio']:.3f} | {w['certify_ratio']:.3f} | {w['indexed']}/{B} | "
                         f"{fmt(w['set_mean'], '.0f')} | {fmt(w['set_max'], 'd')} | {w['over_cap']} | "
                         f"{fmt(w['err'], '.1e')} |")
        lines.append("")
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        s = [w["sigma"] for w in r["rows"]]
        ax[0].loglog(s, [w["ratio"] for w in r["rows"]], "o-", label=f"N = {r['n']:,}")
        ax[1].loglog(s, [w["time_s"] for w in r["rows"]], "o-", label=f"N = {r['n']:,}")
    for a in ax:
        a.set_xlabel("sigma")
        a.legend()
    ax[0].axhline(0.1, ls=":", c="k")
    ax[0].axhline(1.4, ls=":", c="r")
    ax[0].set_ylabel("indexed time / full pass")
    ax[1].set_ylabel("indexed time (s), B = 16")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_nsweep.png", dpi=100)


def test_index_small(benchmark):
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4000, 192, generator=g) * 2 - 1
    kd = KDEDenoiser(y, index=dict(cache=False))
    x = y[:16] + 0.01 * torch.randn(16, 192, generator=g)
    out, st = benchmark(lambda: kd(x, 0.01, return_stats=True))
    assert bool((st.path == INDEXED).all())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="50000,200000,1000000")
    ap.add_argument("--exact-queries", default="4,2,1", help="queries checked against float64, per N")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rank", type=int, default=128, help="the index rank (results: kde_index_r<rank>.* unless 128)")
    ap.add_argument("--ranks", default=None, help="e.g. 32,64,128,256: set sizes by index rank at the first N")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ns = [int(v) for v in a.n.split(",")]
    eq = [int(v) for v in a.exact_queries.split(",")]
    data = np.load(build_dataset(default_path()), mmap_mode="r")
    if a.ranks:
        write_ranks(rank_sweep(data, ns[0], [int(v) for v in a.ranks.split(",")]), meta_info())
        return
    results = [run_n(data, n, eq[min(i, len(eq) - 1)], a.rank) for i, n in enumerate(ns)]
    write(results, "kde_index" if a.rank == 128 else f"kde_index_r{a.rank}")


if __name__ == "__main__":
    main()
