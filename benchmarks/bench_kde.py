"""KDE denoiser speed and exactness: cpu exact vs the sgemm roofline, naive cdist+softmax+matmul,
per-sample loop, on the queries users make.

Queries: data points plus sigma-scaled noise; the points of a real 10-step Euler trajectory (each
step's sigma, solved with the denoiser itself from seeded noise); far-from-data points
(|x - mean| = 1e4) and N(0, I) points.
Default (CI): a tiny problem, so ``pytest benchmarks/bench_kde.py --benchmark-disable`` is quick.
``GEOSAMPLE_BENCH_FULL=1``: CIFAR size N = 50,000, D = 3072 (the decoded CIFAR-10 cache when
present, else seeded random data), B in {16, 64, 256}, sigma in {80, 1, 0.02}.
``python benchmarks/bench_kde.py`` measures every ratio in one process and writes
benchmarks/results/kde_cpu.{json,md} (noisy data points), kde_trajectory.{json,md} (per-sigma
along the trajectory, far and random queries, precision="fast") and kde_exactness.{json,md}
(the hostile cases of the exactness tests against a float64 softmax, every backend that runs here).
``python benchmarks/bench_kde.py exactness|trajectory|speed`` runs only those tables.
CUDA only (skipped without a GPU): the triton backend vs naive torch, the chunked torch stream
(backend "cpu" on CUDA tensors) and scaled_dot_product_attention, at N = 1e6 synthetic D = 64
(the fused small-D kernel) and CIFAR size N = 50,000, D = 3072; TFLOP/s = 4 B N D / time.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import geosample as gs
from geosample import data as gsdata
from geosample._io import atomic_write_text

FULL = os.environ.get("GEOSAMPLE_BENCH_FULL") == "1"
BATCHES = (16, 64, 256) if FULL else (4, 16)
SIGMAS = (80.0, 1.0, 0.02)
LOOP_SUBSET = 4


def dataset():
    """[N, D] float32: CIFAR-10 (cached decode) at full size, else seeded random."""
    if FULL:
        try:
            return gsdata.load_dataset("cifar10").reshape(50000, -1), "cifar10"
        except (FileNotFoundError, ValueError):
            pass
    n, d = (50000, 3072) if FULL else (2000, 192)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, d, generator=g) * 2 - 1, "random"


def queries(y, b, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, y.shape[0], (b,), generator=g)
    return y[idx.to(y.device)] + sigma * torch.randn(b, y.shape[1], generator=g).to(y.device)


def naive(y, x, sigma):
    """cdist + softmax + matmul: materialises the [B, N] matrix."""
    return torch.softmax(-torch.cdist(x, y) ** 2 / (2 * sigma ** 2), dim=1) @ y


def per_sample(y, x, sigma):
    """The reference implementation's style: one query at a time, direct differences."""
    out = []
    for xi in x:
        w = torch.softmax(-((xi[None] - y) ** 2).sum(1) / (2 * sigma ** 2), dim=0)
        out.append(w @ y)
    return torch.stack(out)


def timeit(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def sgemm_rate(b, n, d, repeat=3):
    """float32 matmul FLOP/s of torch.mm at the KDE's shapes ([B, D] x [D, N] and [B, N] x [N, D])."""
    g = torch.Generator().manual_seed(2)
    x, y, p = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g), torch.rand(b, n, generator=g)
    t = timeit(lambda: (torch.mm(x, y.T), torch.mm(p, y)), repeat)
    return 4 * b * n * d / t


@pytest.fixture(scope="module")
def problem():
    y, _ = dataset()
    return y, gs.KDEDenoiser(y, backend="cpu")


TRAJECTORY_STEPS = 10


@functools.lru_cache(maxsize=4)
def trajectory(b: int):
    """(sigmas [steps], points [steps, B, D]): a seeded 10-step Euler solve with the KDE itself."""
    y, _ = dataset()
    kde = gs.KDEDenoiser(y, backend="cpu")
    sigmas = gs.schedules.polynomial(TRAJECTORY_STEPS)
    noise = torch.randn(b, y.shape[1], generator=torch.Generator().manual_seed(5))
    traj = gs.sample(kde, noise, sigmas, solver="euler", return_trajectory=True)
    return sigmas[:-1].tolist(), traj.x[:-1]


def far_queries(y, b, kind, seed=6):
    """"far": |x - mean| = 1e4 in random directions; "random": N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, y.shape[1], generator=g)
    return y.mean(0) + 1e4 * torch.nn.functional.normalize(x, dim=1) if kind == "far" else x


@pytest.mark.parametrize("step", [0, TRAJECTORY_STEPS // 2, TRAJECTORY_STEPS - 1])
def test_cpu_exact_trajectory(benchmark, problem, step):
    """A real trajectory's points at its own sigmas (start, middle, end)."""
    _, kde = problem
    sigmas, points = trajectory(BATCHES[-1])
    assert torch.isfinite(benchmark(kde, points[step], sigmas[step])).all()


@pytest.mark.parametrize("kind", ["far", "random"])
@pytest.mark.parametrize("sigma", [1.0, 0.002])
def test_cpu_exact_far(benchmark, problem, kind, sigma):
    y, kde = problem
    assert torch.isfinite(benchmark(kde, far_queries(y, BATCHES[-1], kind), sigma)).all()


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_cpu_exact(benchmark, problem, b, sigma):
    y, kde = problem
    x = queries(y, b, sigma)
    out = benchmark(kde, x, sigma)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("b", BATCHES)
def test_naive(benchmark, problem, b):
    y, _ = problem
    x = queries(y, b, 1.0)
    assert torch.isfinite(benchmark(naive, y, x, 1.0)).all()


CUDA = torch.cuda.is_available()
GPU_PROBLEMS = {"synthetic_1e6_d64": (1_000_000, 64), "cifar_50k_d3072": (50000, 3072)}


@functools.lru_cache(maxsize=2)
def gpu_problem(name):
    """[N, D] float32 on CUDA: CIFAR-10 (cached decode) when present at CIFAR size, else seeded random."""
    n, d = GPU_PROBLEMS[name]
    y = None
    if d == 3072:
        try:
            y = gsdata.load_dataset("cifar10").reshape(n, d)
        except (FileNotFoundError, ValueError):
            pass
    if y is None:
        y = torch.rand(n, d, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.as_tensor(y).cuda()


def sdpa(y, x, sigma):
    """softmax((x.y - |y|^2/2) / sigma^2) y as one attention head: q = [x / sigma^2, -1 / (2 sigma^2)],
    k = [y, |y|^2], v = y, scale 1."""
    q = torch.cat([x / sigma ** 2, x.new_full((x.shape[0], 1), -0.5 / sigma ** 2)], 1)
    k = torch.cat([y, (y * y).sum(1, keepdim=True)], 1)
    return torch.nn.functional.scaled_dot_product_attention(q[None, None], k[None, None], y[None, None], scale=1.0)[0, 0]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(GPU_PROBLEMS))
@pytest.mark.parametrize("method", ["triton", "naive", "chunked", "sdpa"])
@pytest.mark.parametrize("b", (16, 256))
@pytest.mark.parametrize("sigma", (1.0, 0.02))
def test_gpu(benchmark, name, method, b, sigma):
    y = gpu_problem(name)
    x = queries(y, b, sigma)
    if method in ("triton", "chunked"):                     # chunked: the streaming torch path on CUDA
        fn = gs.KDEDenoiser(y, backend="triton" if method == "triton" else "cpu")
    else:
        fn = functools.partial(naive if method == "naive" else sdpa, y)

    def run():
        out = fn(x, sigma)
        torch.cuda.synchronize()
        return out

    run()                                                   # compile / copy to the device outside the timing
    out = benchmark(run)
    assert out.shape == x.shape and torch.isfinite(out).all()
    n, d = y.shape
    benchmark.extra_info.update(N=n, D=d, B=b, device=torch.cuda.get_device_name())
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = 4 * b * n * d / benchmark.stats.stats.mean / 1e12


def measure():
    """All ratios in one process; returns the result record."""
    y, source = dataset()
    n, d = y.shape
    kde = gs.KDEDenoiser(y, backend="cpu")
    rows = []
    for b in BATCHES:
        rate = sgemm_rate(b, n, d)
        roof = 4 * b * n * d / rate
        t_naive = timeit(lambda: naive(y, queries(y, b, 1.0), 1.0))
        xs = queries(y, LOOP_SUBSET, 1.0)
        t_loop = timeit(lambda: per_sample(y, xs, 1.0), repeat=1) * b / LOOP_SUBSET
        for sigma in SIGMAS:
            x = queries(y, b, sigma)
            t = timeit(lambda: kde(x, sigma))
            rows.append(dict(B=b, sigma=sigma, cpu_exact_s=t, roofline_s=roof, sgemm_gflops=rate / 1e9,
                             naive_s=t_naive, per_sample_loop_s=t_loop, vs_roofline=t / roof,
                             speedup_vs_naive=t_naive / t, speedup_vs_loop=t_loop / t))
            print(rows[-1], flush=True)
    return dict(header(source, n, d, kde), per_sample_loop_note=f"timed on {LOOP_SUBSET} queries and scaled to B",
                rows=rows)


def float64_error(y, x, sigma, out):
    """Largest relative L2 error per query against the float64 direct-difference softmax."""
    ref = gs.KDEDenoiser(y, backend="reference")(x.double(), sigma)
    return ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def path_counts(stats):
    """{path name: queries} from KDEStats.path (absent before the exact paths existed)."""
    path = getattr(stats, "path", None)
    if path is None:
        return {}
    names = ("exact", "mixed", "full64", "fast")
    return {names[i]: int(c) for i, c in enumerate(torch.bincount(path.long(), minlength=4).tolist()) if c}


def measure_trajectory(b=64, error_queries=4):
    """Per sigma of a real trajectory, then far / random queries: time, x roofline, path counts,
    error of the first ``error_queries`` queries; precision="fast" beside, for its speed-up and error."""
    y, source = dataset()
    n, d = y.shape
    exact, fast = gs.KDEDenoiser(y, backend="cpu"), gs.KDEDenoiser(y, backend="cpu", precision="fast")
    roof = 4 * b * n * d / sgemm_rate(b, n, d)
    sigmas, points = trajectory(b)
    cases = [("trajectory", s, points[i]) for i, s in enumerate(sigmas)]
    cases += [(kind, s, far_queries(y, b, kind)) for kind in ("far", "random") for s in (1.0, 0.002)]
    rows = []
    for kind, sigma, x in cases:
        t = timeit(lambda: exact(x, sigma))
        out, stats = exact(x, sigma, return_stats=True)
        t_fast = timeit(lambda: fast(x, sigma))
        sub = x[:error_queries]
        rows.append(dict(queries=kind, sigma=sigma, exact_s=t, roofline_s=roof, vs_roofline=t / roof,
                         paths=path_counts(stats), error=float64_error(y, sub, sigma, out[:error_queries]),
                         fast_s=t_fast, fast_speedup=t / t_fast,
                         fast_error=float64_error(y, sub, sigma, fast(sub, sigma))))
        print(rows[-1], flush=True)
    return dict(header(source, n, d, exact), B=b, error_queries=error_queries, rows=rows)


def header(source, n, d, kde):
    return dict(date=datetime.date.today().isoformat(), machine=platform.machine(),
                processor=platform.processor() or platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, numpy=np.__version__,
                python=sys.version.split()[0], geosample=gs.__version__, data=source, N=n, D=d,
                chunk_size=kde.chunk_size)


def machine_line(r):
    return (f"{r['processor']}, {r['cpu_count']} cores ({r['torch_threads']} torch threads), torch {r['torch']}, "
            f"numpy {r['numpy']}, Python {r['python']}; data {r['data']} N={r['N']} D={r['D']}, chunk {r['chunk_size']}.")


def write_trajectory(result, out_dir, name="kde_trajectory"):
    atomic_write_text(out_dir / f"{name}.json", json.dumps(result, indent=1))
    lines = [f"# KDE denoiser along a real trajectory, far and random queries ({result['date']})", "",
             machine_line(result) + f" B = {result['B']}; x roofline = time / (two float32 GEMMs at the same "
             f"shapes, measured in the same process); error = largest relative L2 error of {result['error_queries']} "
             "queries against the float64 direct-difference softmax; paths = how many queries took each exact path "
             "(docs/closed_form.md).", "",
             "| queries | sigma | exact (ms) | x roofline | paths | error | fast (ms) | fast speed-up | fast error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        paths = " ".join(f"{k} {v}" for k, v in r["paths"].items())
        lines.append(f"| {r['queries']} | {r['sigma']:.4g} | {1e3 * r['exact_s']:.0f} | {r['vs_roofline']:.2f} | "
                     f"{paths} | {r['error']:.1e} | {1e3 * r['fast_s']:.0f} | {r['fast_speedup']:.2f}x | "
                     f"{r['fast_error']:.1e} |")
    atomic_write_text(out_dir / f"{name}.md", "\n".join(lines) + "\n")


def hostile_cases(y):
    """The exactness issue's hostile inputs on data y [N, D]: (name, data, queries [4, D], sigma)."""
    g = torch.Generator().manual_seed(7)
    b, d = 4, y.shape[1]
    i = torch.randint(0, y.shape[0] // 2, (b,), generator=g)
    noise = torch.randn(b, d, generator=g)
    pairs = y.clone()
    pairs[i + 1] = y[i] + 0.01 * torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    raw = (y + 1) * 127.5
    far = y.mean(0) + 1e4 * torch.nn.functional.normalize(noise, dim=1)
    return [("rows 0.01 apart, query halfway", pairs, (pairs[i] + pairs[i + 1]) / 2, 0.002),
            ("query 1e-5 from a row", y, y[i] + 1e-5 * noise, 3e-5),
            ("query 1e-5 from a row", y, y[i] + 1e-5 * noise, 1e-6),
            ("data + 1e4", y + 1e4, y[i] + 1e4 + noise, 1.0),
            ("data + 1e3", y + 1e3, y[i] + 1e3 + 0.05 * noise, 0.05),
            ("raw 0..255 pixels", raw, raw[i] + 0.002 * noise, 0.002),
            ("queries 1e4 from the data mean", y, far, 0.002),
            ("N(0, I) queries", y, noise, 1.0)]


def measure_exactness():
    """Every hostile case: the float64 error of the cpu exact and fast paths, and the paths taken."""
    y, source = dataset()
    rows = []
    for name, data, x, sigma in hostile_cases(y):
        kde = gs.KDEDenoiser(data, backend="cpu")
        row = dict(case=name, sigma=sigma)
        try:
            out, stats = kde(x, sigma, return_stats=True)
            row.update(exact_error=float64_error(data, x, sigma, out), paths=path_counts(stats))
        except (ValueError, FloatingPointError, RuntimeError) as e:       # what the old code raised
            row.update(exact_error=math.nan, paths={}, raised=f"{type(e).__name__}: {e}")
        row["fast_error"] = float64_error(data, x, sigma, gs.KDEDenoiser(data, backend="cpu", precision="fast")(x, sigma))
        rows.append(row)
        print(row, flush=True)
    return dict(header(source, *y.shape, kde), rows=rows)


def write_exactness(result, out_dir, name="kde_exactness"):
    atomic_write_text(out_dir / f"{name}.json", json.dumps(result, indent=1))
    lines = [f"# KDE denoiser on hostile inputs ({result['date']}, geosample {result['geosample']})", "",
             machine_line(result) + " Error = largest relative L2 error of 4 queries against the float64 "
             "direct-difference softmax over the same rows (goal: 1e-5 for exact).", "",
             "| case | sigma | exact error | paths | fast (bf16) error |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        paths = " ".join(f"{k} {v}" for k, v in r["paths"].items())
        lines.append(f"| {r['case']} | {r['sigma']:g} | {r['exact_error']:.1e} | {paths} | {r['fast_error']:.1e} |")
    atomic_write_text(out_dir / f"{name}.md", "\n".join(lines) + "\n")


def write(result, out_dir):
    atomic_write_text(out_dir / "kde_cpu.json", json.dumps(result, indent=1))
    lines = [f"# KDE denoiser, cpu exact backend ({result['date']})", "",
             machine_line(result) + f" Per-sample loop {result['per_sample_loop_note']}.", "",
             "| B | sigma | cpu exact (ms) | roofline (ms) | x roofline | naive (ms) | vs naive | loop (s) | vs loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['B']} | {r['sigma']:g} | {1e3 * r['cpu_exact_s']:.0f} | {1e3 * r['roofline_s']:.0f} | "
                     f"{r['vs_roofline']:.2f} | {1e3 * r['naive_s']:.0f} | {r['speedup_vs_naive']:.1f}x | "
                     f"{r['per_sample_loop_s']:.1f} | {r['speedup_vs_loop']:.0f}x |")
    atomic_write_text(out_dir / "kde_cpu.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="KDE benchmarks (GEOSAMPLE_BENCH_FULL=1 for CIFAR-10 size)")
    parser.add_argument("parts", nargs="*", help="exactness, trajectory and/or speed (default: all three)")
    parser.add_argument("--suffix", default="", help="appended to the result names, e.g. _before for an older build")
    args = parser.parse_args()
    args.parts = args.parts or ["exactness", "trajectory", "speed"]
    if set(args.parts) - {"exactness", "trajectory", "speed"}:
        parser.error(f"unknown parts {sorted(set(args.parts) - {'exactness', 'trajectory', 'speed'})}")
    out = Path(__file__).parent / "results"
    if "exactness" in args.parts:
        write_exactness(measure_exactness(), out, "kde_exactness" + args.suffix)
    if "trajectory" in args.parts:
        write_trajectory(measure_trajectory(), out, "kde_trajectory" + args.suffix)
    if "speed" in args.parts:
        write(measure(), out)
