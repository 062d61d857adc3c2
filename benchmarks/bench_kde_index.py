"""The closed-form denoiser over up to a million images, default settings, against a two-GEMM pass.

``pytest benchmarks/bench_kde_index.py`` (CI): a tiny problem.  ``python benchmarks/bench_kde_index.py
[--n 50000,200000,1000000]`` measures on CIFAR-10 x 20 seeded shifts/flips (N up to 1,000,000,
D = 3072, uint8 memmap built by benchmarks/make_cifar_x20.py outside the repo), B = 16 queries =
data rows plus sigma-scaled noise, in one process:

- the roofline: two float32 GEMMs per block over float32 rows in memory (the best block size of
  256, 1024, 4096 rows), at this machine's rate, scaled to N rows;
- per sigma (a 10-step EDM schedule plus 0.5, 0.2, 0.05, 0.01), the call with ``index=False`` (the
  full pass) and with the default settings (``index="auto"``, built before timing), interleaved,
  best of two, as ratios to the roofline; the paths taken, certified set sizes, and the error
  against the float64 reference (backend="reference") on a few queries;
- where a full pass goes (``--breakdown``): the block conversion alone, with the two GEMMs, the
  whole streaming pass, the call (re-scoring and bounds included);
- a 10-step iPNDM trajectory from noise (gs.sample, B = 16): total time with the default settings
  (the index built during it, into an empty cache) against the same trajectory with index=False;
- the setup (two passes), the content hash, the index build time, its size and hit rate, and the
  process's RssAnon (memmapped file pages are the OS's cache).

Each N is one run; results are merged into benchmarks/results/kde_index.json by N (run the N one at a
time to keep each under ~30 minutes) and kde_index.md / kde_index_nsweep.png are regenerated from
all of them.  ``--ranks 32,64,128,256`` instead records the certified set sizes by one-level rank at
the first N (kde_index_rank.{json,md}).
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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import geosample as gs
from geosample import schedules
from geosample._io import atomic_write_text
from geosample.denoisers import kde as kde_module
from geosample.denoisers.kde import KDEDenoiser, Query, stream
from geosample.denoisers.kde_index import INDEXED, KDEIndex

sys.path.insert(0, str(Path(__file__).parent))
from make_cifar_x20 import build as build_dataset, default_path  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIGMAS = sorted(set(schedules.polynomial(10).tolist()) | {0.5, 0.2, 0.05, 0.01}, reverse=True)
GOALS = {80.0: 1.4, 2.52: 1.4, 0.5: 0.1, 0.05: 0.1}     # the table: sigma -> largest ratio to the roofline
B = 16
AUTO_N = kde_module.INDEX_AUTO_N                         # the library's default (--index-auto-n changes it for a run)


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


def roofline_per_row(data, rows: int = 32768) -> float:
    """Seconds per row of two float32 GEMMs (B x D by D x C, then B x C by C x D) per block over
    float32 rows in memory: the best of block sizes 256, 1024, 4096."""
    f32 = torch.from_numpy(np.asarray(data[:rows])).reshape(rows, -1).float()
    xs, best = torch.randn(B, f32.shape[1]), math.inf
    for c in (256, 1024, 4096):
        out, s, p = torch.empty(B, c), torch.zeros(B, f32.shape[1]), torch.rand(B, c)

        def two_gemms():
            for a in range(0, rows, c):
                y = f32[a:a + c]
                torch.mm(xs, y.T, out=out[:, : len(y)])
                s.addmm_(p[:, : len(y)], y)
        best = min(best, timed(two_gemms, 3)[0])
    return best / rows


def breakdown(kd: KDEDenoiser, sigma: float = 80.0) -> dict:
    """Seconds of one full pass at ``sigma``: the block conversion alone, with the two GEMMs, the
    streaming pass, the whole call (re-scoring and bounds)."""
    st, x = kd.store, queries(kd, sigma)
    q = Query.prepare(st, x.reshape(B, -1).double(), torch.full((B,), sigma, dtype=torch.float64) ** -2)
    xs, inv, rows = q.scaled32(st.scale), q.inv.float(), st.block_rows()
    buf, out, s = torch.empty(rows, st.dim), torch.empty(B, rows), torch.zeros(B, st.dim)
    p = torch.rand(B, rows)

    def convert(gemms):
        for a, e in st.ranges(rows):
            y = st.stream_block(a, e, buf)
            if gemms:
                torch.mm(xs, y.T, out=out[:, : e - a])
                s.addmm_(p[:, : e - a], y)
    index, kd.index = kd.index, None
    res = dict(convert_s=timed(lambda: convert(False), 2)[0], convert_gemms_s=timed(lambda: convert(True), 2)[0],
               stream_s=timed(lambda: stream(st, xs, inv, 0, st.n, kd.refine_k), 2)[0],
               call_s=timed(lambda: kd(x, sigma), 2)[0])
    kd.index = index
    return res


def trajectory(kd: KDEDenoiser, seed: int = 3) -> tuple[float, list]:
    """Seconds of a 10-step iPNDM trajectory from noise (B = 16), and the paths per call."""
    paths = []
    noise = torch.randn((B, *kd.shape), generator=torch.Generator().manual_seed(seed))   # sample scales it by 80

    def den(x, s):
        out, st = kd(x, s, return_stats=True)
        paths.append(dict(sigma=float(torch.as_tensor(s).reshape(-1)[0]), indexed=int((st.path == INDEXED).sum())))
        return out
    t, _ = timed(lambda: gs.sample(den, noise, schedules.polynomial(10)))
    return t, paths


def run_n(data, n: int, exact_q: int, do_breakdown: bool) -> dict:
    y = data[:n]
    t_setup, full = timed(lambda: KDEDenoiser(y, index=False))
    t_hash = timed(full.store.digest)[0]
    roof = roofline_per_row(data) * n
    saved = os.environ.get("GEOSAMPLE_CACHE")
    with tempfile.TemporaryDirectory() as cache:              # the default settings, from an empty cache
        os.environ["GEOSAMPLE_CACHE"] = cache
        t_traj_full, _ = trajectory(full)
        mem0 = rss_anon_mb()
        auto = KDEDenoiser(y)
        t_traj, traj_paths = trajectory(auto)
        if auto.index is None and auto._index_options is not None:
            auto._build_index()
        t_warm = trajectory(KDEDenoiser(y))[0]                # a second session: the index from the cache
    os.environ.pop("GEOSAMPLE_CACHE") if saved is None else os.environ.update(GEOSAMPLE_CACHE=saved)
    index = auto.index
    ref = KDEDenoiser.__new__(KDEDenoiser)
    ref.__dict__.update(full.__dict__, backend="reference")
    rows = []
    for s in SIGMAS:
        x = queries(full, s)
        t_full = t_auto = math.inf
        for _ in range(2):                              # interleaved, best of two: the same load on both
            t_full = min(t_full, timed(lambda: full(x, s))[0])
            t_a, (out, st) = timed(lambda: auto(x, s, return_stats=True))
            t_auto = min(t_auto, t_a)
        row = dict(sigma=s, full_s=t_full, auto_s=t_auto, full_ratio=t_full / roof, auto_ratio=t_auto / roof,
                   indexed=int((st.path == INDEXED).sum()), paths=torch.bincount(st.path.long(), minlength=5).tolist())
        if index is not None:
            q = Query.prepare(full.store, x.reshape(B, -1).double(), torch.full((B,), s, dtype=torch.float64) ** -2)
            _, cols, big = index.certify(full.store, q, 2.0 * np.log(n / index.tol) / q.inv_s2)
            sizes = torch.bincount(cols, minlength=B).double()
            row.update(set_mean=float(sizes[~big].mean()) if (~big).any() else None,
                       set_max=int(sizes[~big].max()) if (~big).any() else None, over_cap=int(big.sum()))
        if exact_q and (n <= 200_000 or any(abs(s - g) / g < 0.01 for g in GOALS)):
            r = ref(x[:exact_q], s)
            row.update(err_auto=rel_err(out[:exact_q], r), err_full=rel_err(full(x[:exact_q], s), r))
        rows.append(row)
        print(n, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return dict(n=n, setup_s=t_setup, hash_s=t_hash, roofline_s=roof, build_s=index.build_s if index else None,
                index_bytes=index.nbytes if index else None, rank=index.rank if index else None,
                fine_rank=index.fine_rank if index else None, report=index.report() if index else None,
                index_below=auto.index_below, rss_anon_index_mb=rss_anon_mb() - mem0, rss_anon_mb=rss_anon_mb(),
                maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                trajectory=dict(auto_s=t_traj, warm_s=t_warm, full_s=t_traj_full, calls=traj_paths),
                breakdown=breakdown(full) if do_breakdown else None, rows=rows)


def rank_sweep(data, n: int, ranks: list[int], sigmas=(0.2, 0.318, 0.5, 0.7)) -> dict:
    """Certified set sizes (every query certified, no cap) by one-level index rank, and the build time."""
    kd = KDEDenoiser(data[:n], index=False)
    out = []
    for r in ranks:
        t_build, index = timed(lambda: KDEIndex.build(kd.store, rank=r, fine_rank=r, cache=False, max_fraction=1.0))
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
             "every query certified (no cap), one level (fine_rank = rank); mean / max rows per certified set.  "
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
                torch=torch.__version__, threads=torch.get_num_threads(), batch=B,
                load=os.getloadavg()[0], index_auto_n=kde_module.INDEX_AUTO_N)


def _fmt(v, f):
    return "-" if v is None else format(v, f)


def write(results: list[dict], name: str = "kde_index"):
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    runs = {r["n"]: r for r in old if "roofline_s" in r}      # (runs of this script's format only)
    runs.update({r["n"]: r for r in results})                  # merged by N: each N is its own run
    results = [runs[n] for n in sorted(runs)]
    atomic_write_text(path, json.dumps(dict(runs=results), indent=1))
    lines = ["# The closed-form denoiser over up to 10^6 images: default settings vs the full pass vs two GEMMs", "",
             f"CIFAR-10 x 20 seeded shifts/flips (uint8 memmap), D = 3072, B = {B} queries = data rows + sigma noise. "
             "Ratios are to the roofline: two float32 GEMMs per block over float32 rows in memory at this machine's "
             "measured rate (the best of 256 / 1024 / 4096-row blocks), scaled to N rows. `no index` = "
             "`KDEDenoiser(y, index=False)` (the full exact pass), `default` = `KDEDenoiser(y)` (index=\"auto\", "
             "built before timing); interleaved, best of two each, one process. Errors are against the float64 "
             "reference backend on the first queries. Each N is a separate run (its machine, date and load below).", ""]
    big = max(results, key=lambda r: r["n"])
    lines += [f"## The issue's table, N = {big['n']:,}", "",
              "| sigma | no index | default | goal | exact (default vs float64) |", "|---|---|---|---|---|"]
    for g, goal in GOALS.items():
        w = min(big["rows"], key=lambda w: abs(w["sigma"] - g))
        ok = "yes" if w["auto_ratio"] <= goal else "NO"
        lines.append(f"| {w['sigma']:.3g} | {w['full_ratio']:.2f}x | {w['auto_ratio']:.3f}x | <= {goal}x ({ok}) | "
                     f"{_fmt(w.get('err_auto'), '.1e')} |")
    lines.append("")
    for r in results:
        m, t = r["meta"], r["trajectory"]
        lines += [f"## N = {r['n']:,}", "",
                  f"{m['date']}, torch {m['torch']}, {m['threads']} threads, {m['machine']}, load {m['load']:.2f} at "
                  f"the start" + ("" if m["index_auto_n"] == AUTO_N else
                                   f", INDEX_AUTO_N = {m['index_auto_n']} for this run (the index at this N too)")
                  + f". Roofline {r['roofline_s']:.2f} s; setup (mean and norms) {r['setup_s']:.1f} s; "
                  f"content hash (sha256 of every byte, the cache key) {r['hash_s']:.2f} s; index "
                  + (f"build {r['build_s']:.1f} s (= {r['build_s'] / r['roofline_s']:.1f} roofline passes), "
                     f"{r['index_bytes'] / 2 ** 20:.0f} MB (ranks {r['rank']} / {r['fine_rank']}), built at the first "
                     f"call with sigma <= {r['index_below']:.3f}, hit rate {_fmt(r['report']['hit_rate'], '.2f')} "
                     f"over the trajectory's and the table's calls" if r["build_s"] is not None else "none (below INDEX_AUTO_N)")
                  + f"; RssAnon {r['rss_anon_mb']:.0f} MB.", "",
                  f"10-step iPNDM trajectory from noise, B = {B}: index=False {t['full_s']:.1f} s; default settings "
                  f"{t['auto_s']:.1f} s = {t['auto_s'] / t['full_s']:.2f}x (the index built during it, into an empty "
                  f"cache), {t['warm_s']:.1f} s = {t['warm_s'] / t['full_s']:.2f}x in a second session (the index "
                  f"loaded from the cache); calls answered on certified sets: "
                  + ", ".join(f"{c['sigma']:.3g}: {c['indexed']}/{B}" for c in t["calls"]) + ".", ""]
        if r.get("breakdown"):
            bd = r["breakdown"]
            lines += ["Where a full pass goes (sigma 80, x roofline): block conversion "
                      f"{bd['convert_s'] / r['roofline_s']:.2f}, conversion + two GEMMs "
                      f"{bd['convert_gemms_s'] / r['roofline_s']:.2f}, streaming pass (+ softmax, top-k) "
                      f"{bd['stream_s'] / r['roofline_s']:.2f}, the call (+ re-scoring, bounds) "
                      f"{bd['call_s'] / r['roofline_s']:.2f}.", ""]
        lines += ["| sigma | no index s | x roofline | default s | x roofline | on certified sets | set mean | set max "
                  "| err no index | err default |", "|---|---|---|---|---|---|---|---|---|---|"]
        for w in r["rows"]:
            lines.append(f"| {w['sigma']:.3g} | {w['full_s']:.3f} | {w['full_ratio']:.3f} | {w['auto_s']:.3f} | "
                         f"{w['auto_ratio']:.3f} | {w['indexed']}/{B} | {_fmt(w.get('set_mean'), '.0f')} | "
                         f"{_fmt(w.get('set_max'), 'd')} | {_fmt(w.get('err_full'), '.1e')} | "
                         f"{_fmt(w.get('err_auto'), '.1e')} |")
        lines.append("")
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        s = [w["sigma"] for w in r["rows"]]
        ax[0].loglog(s, [w["auto_ratio"] for w in r["rows"]], "o-", label=f"default, N = {r['n']:,}")
        ax[0].loglog(s, [w["full_ratio"] for w in r["rows"]], ":", c=ax[0].lines[-1].get_color())
    ns = [r["n"] for r in results]
    ax[1].loglog(ns, [r["trajectory"]["auto_s"] for r in results], "o-", label="trajectory, default")
    ax[1].loglog(ns, [r["trajectory"]["warm_s"] for r in results], "o--", label="trajectory, default, cached index")
    ax[1].loglog(ns, [r["trajectory"]["full_s"] for r in results], "s:", label="trajectory, index=False")
    ax[1].loglog(ns, [r["build_s"] or float("nan") for r in results], "^-", label="index build")
    ax[0].axhline(0.1, ls=":", c="k")
    ax[0].axhline(1.4, ls=":", c="r")
    ax[0].set_xlabel("sigma")
    ax[0].set_ylabel("time / roofline (dotted: index=False)")
    ax[1].set_xlabel("N")
    ax[1].set_ylabel("seconds")
    for a in ax:
        a.legend(fontsize=7)
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
    ap.add_argument("--exact-queries", type=int, default=2, help="queries checked against float64 per sigma")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--breakdown", action="store_true", help="time the parts of a full pass too")
    ap.add_argument("--ranks", default=None, help="e.g. 32,64,128,256: set sizes by index rank at the first N")
    ap.add_argument("--index-auto-n", type=int, default=None,
                    help="INDEX_AUTO_N for this run (0: the index at every N, to measure where it pays)")
    a = ap.parse_args()
    if a.index_auto_n is not None:
        kde_module.INDEX_AUTO_N = a.index_auto_n
    if a.threads:
        torch.set_num_threads(a.threads)
    ns = [int(v) for v in a.n.split(",")]
    data = np.load(build_dataset(default_path()), mmap_mode="r")
    if a.ranks:
        write_ranks(rank_sweep(data, ns[0], [int(v) for v in a.ranks.split(",")]), meta_info())
        return
    for n in ns:                                                # each N written as soon as it is measured
        meta = meta_info()
        res = run_n(data, n, a.exact_queries, a.breakdown)
        write([dict(res, meta=meta)])


if __name__ == "__main__":
    main()
