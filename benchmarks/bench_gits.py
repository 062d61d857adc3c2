"""GITS speed: cost matrix backends (vs the reference's per-pair loop and this machine's
roofline) and the DP backends.

    pytest benchmarks/bench_gits.py                       # small sizes, pytest-benchmark
    GEOSAMPLE_BENCH_FULL=1 pytest benchmarks/bench_gits.py  # B=64, D=3072, 61 points
    python benchmarks/bench_gits.py                       # full sizes -> benchmarks/results/gits.{json,md}
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import geosample as gs
from geosample._io import atomic_write_text
from geosample.gits.cost import available_backends as cost_backends
from geosample.gits.dp import available_backends

FULL = os.environ.get("GEOSAMPLE_BENCH_FULL") == "1"
B, D, T = (64, 3072, 61) if FULL else (8, 192, 21)


def synthetic_trajectory(b: int, dim: int, t: int, seed: int = 0) -> gs.Trajectory:
    """x[t] = y + G[t] n with a drifting y: the shapes and scales of a real teacher trajectory."""
    g = torch.Generator().manual_seed(seed)
    grid = gs.schedules.polynomial(t - 1)
    n = torch.randn(b, dim, generator=g)
    y = torch.randn(t, b, dim, generator=g).cumsum(0) * 0.05
    x = y + grid.float()[:, None, None] * n
    return gs.Trajectory(x=x, denoised=y[:-1], sigmas=grid, nfe=t - 1)


def reference_cost(traj: gs.Trajectory, metric: str) -> torch.Tensor:
    """The reference's algorithm (diff-sampler gits_utils.get_dp_list): one pair at a time, float32."""
    x, g = traj.x, traj.sigmas.float()
    d = (x[:-1] - traj.denoised) / g[:-1, None, None]
    t = x.shape[0]

    def deviation(pts):                               # cal_deviation: |perp(c - a)| for the middle points
        a, b, c = pts[1:-1].transpose(0, 1), pts[0][:, None], pts[-1][:, None]
        ac, bc = c - a, c - b
        unit = bc / bc.norm(dim=-1, keepdim=True)
        return (ac - (ac * unit).sum(-1, keepdim=True) * unit).norm(dim=-1)

    dev_tea = torch.cat([deviation(x).mean(0), torch.zeros(1)])
    c = torch.zeros(t, t)
    for i in range(t - 1):
        for j in range(i + 1, t):
            nxt = x[i] + (g[j] - g[i]) * d[i]
            if metric == "l2":
                c[i, j] = (nxt - x[j]).norm(dim=-1).mean()
            else:
                c[i, j] = deviation(torch.stack([x[0], nxt, x[-1]])).mean() - dev_tea[j - 1]
    return c


@pytest.fixture(scope="module")
def traj():
    return synthetic_trajectory(B, D, T)


@pytest.mark.parametrize("backend", cost_backends("cpu"))
@pytest.mark.parametrize("metric", ["l2", "dev", "l1"])
def test_cost_matrix(benchmark, traj, metric, backend):
    c = benchmark(gs.gits.cost_matrix, traj, metric, backend=backend)
    assert c.shape == (T, T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", ["l2", "dev", "l1"])
def test_cost_matrix_gpu(benchmark, traj, metric):
    t = gs.Trajectory(x=traj.x.cuda(), denoised=traj.denoised.cuda(), sigmas=traj.sigmas, nfe=traj.nfe)
    ref = gs.gits.cost_matrix(traj, metric, backend="torch")

    def run():
        out = gs.gits.cost_matrix(t, metric, backend="triton")
        torch.cuda.synchronize()
        return out
    c = benchmark(run).cpu()
    m = torch.isfinite(ref)
    assert torch.allclose(c[m], ref[m], rtol=1e-4, atol=1e-4 * float(ref[m].abs().max()))


@pytest.mark.parametrize("metric", ["l2", "dev"])
def test_reference_loop_agrees(traj, metric):
    fast, ref = gs.gits.cost_matrix(traj, metric), reference_cost(traj, metric).double()
    m = torch.isfinite(fast)
    assert torch.allclose(fast[m], ref[m], rtol=2e-3, atol=2e-3 * float(ref[m].abs().max()))


@pytest.mark.parametrize("backend", available_backends())
def test_dp(benchmark, backend):
    c = np.random.default_rng(0).random((61, 61))
    gs.gits.solve_dp(c, 10, backend=backend)           # numba: compile outside the timing
    path = benchmark(gs.gits.solve_dp, c, 10, 1.15, backend)
    assert len(path) == 11


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class TimedDenoiser:
    """Wraps a denoiser and adds up the wall time spent inside it."""

    def __init__(self, denoiser):
        self.denoiser, self.seconds = denoiser, 0.0

    def __call__(self, x, sigma):
        t0 = time.perf_counter()
        out = self.denoiser(x, sigma)
        self.seconds += time.perf_counter() - t0
        return out


def search_breakdown(limit: int = 5000) -> dict:
    """One uncached default search (iPNDM teacher, 256 samples, 61 points, 5 steps) on the KDE of the
    first ``limit`` CIFAR-10 images: total time vs time inside the denoiser."""
    from geosample.data import load_dataset

    den = TimedDenoiser(gs.KDEDenoiser(load_dataset("cifar10", limit=limit)))
    t0 = time.perf_counter()
    gs.gits.search(den, (3, 32, 32), 5, use_cache=False)
    total = time.perf_counter() - t0
    return {"data": f"cifar10, first {limit} images", "total_s": total, "denoiser_s": den.seconds,
            "other_fraction": 1 - den.seconds / total}


def roofline(traj: gs.Trajectory) -> dict:
    """This machine's practical limits, measured in the same process: memory bandwidth (a float32
    sum over x and denoised, which dev must read once) and float32 FMA throughput (sgemm)."""
    x, den = traj.x, traj.denoised
    sweep = _best(lambda: (x.sum(), den.sum()), 5)
    a = torch.randn(2048, 2048)
    mm = _best(lambda: a @ a, 5)
    return {"read_GBs": (x.numel() + den.numel()) * 4 / sweep / 1e9, "read_x_den_s": sweep,
            "sgemm_GFLOPs": 2 * 2048 ** 3 / mm / 1e9}


def pair_flops(traj: gs.Trajectory) -> float:
    """l1 / l2 work: T(T-1)/2 pairs x B x D elements, 5 flops each (subtract, multiply-add, square-add)."""
    t, b = traj.x.shape[:2]
    return t * (t - 1) / 2 * b * traj.x[0, 0].numel() * 5


def main() -> None:
    traj = synthetic_trajectory(64, 3072, 61)
    rows = {"cost_matrix": {}, "dp": {}, "roofline": roofline(traj)}
    print(rows["roofline"], flush=True)
    for metric in ("l2", "dev", "l1"):
        r = {f"{b}_s": _best(lambda: gs.gits.cost_matrix(traj, metric, backend=b), 15 if b != "torch" else 3)
             for b in cost_backends("cpu")}
        if metric != "l1":
            r["reference_loop_s"] = _best(lambda: reference_cost(traj, metric), 1)
            r.update({f"{b}_speedup": r["reference_loop_s"] / r[f"{b}_s"] for b in cost_backends("cpu")})
        best = min(r[f"{b}_s"] for b in cost_backends("cpu"))
        if metric == "dev":
            r["of_roofline"] = rows["roofline"]["read_x_den_s"] / best
        else:
            r["GFLOPs"] = pair_flops(traj) / best / 1e9
            r["of_roofline"] = r["GFLOPs"] / rows["roofline"]["sgemm_GFLOPs"]
        rows["cost_matrix"][metric] = r
        print(metric, r, flush=True)
    c = np.random.default_rng(0).random((61, 61))
    for backend in available_backends():
        gs.gits.solve_dp(c, 10, backend=backend)
        n = 200 if backend != "python" else 20
        rows["dp"][backend] = {"us": 1e6 * _best(lambda: [gs.gits.solve_dp(c, 10, backend=backend) for _ in range(n)], 5) / n}
        print(backend, rows["dp"][backend], flush=True)
    rows["search"] = search_breakdown()
    print(rows["search"], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "sizes": "B=64, D=3072, 61 grid points; DP 61 points, 10 steps"}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    atomic_write_text(out / "gits.json", json.dumps({"meta": meta, **rows}, indent=1))
    roof = rows["roofline"]
    lines = [f"# GITS speed ({meta['date']}, {meta['cpus']} CPU cores, {meta['machine']}, torch {meta['torch']})", "",
             f"{meta['sizes']}; best of several runs, reference loop run once in the same process.", "",
             f"Roofline measured in the same process: reading x and denoised (float32) {roof['read_x_den_s'] * 1e3:.1f} ms "
             f"({roof['read_GBs']:.1f} GB/s); sgemm {roof['sgemm_GFLOPs']:.0f} GFLOP/s.", "",
             "| metric | cpp | torch (float64) | reference per-pair loop | cpp speedup | torch speedup | cpp vs roofline |",
             "|---|---|---|---|---|---|---|"]
    for metric in ("l2", "dev", "l1"):
        r = rows["cost_matrix"][metric]
        ref = f"{r['reference_loop_s']:.2f} s" if "reference_loop_s" in r else ""
        speed = [f"{r[k]:.0f}x" if k in r else "" for k in ("cpp_speedup", "torch_speedup")]
        roofs = (f"{r['of_roofline']:.2f} of the read time" if metric == "dev" else
                 f"{r['GFLOPs']:.0f} GFLOP/s = {r['of_roofline']:.2f} of sgemm")
        lines.append(f"| {metric} | {r.get('cpp_s', float('nan')) * 1e3:.1f} ms | {r['torch_s'] * 1e3:.1f} ms | {ref} | "
                     f"{speed[0]} | {speed[1]} | {roofs} |")
    lines += ["", "| DP backend (61 points, 10 steps) | time per call |", "|---|---|"]
    lines += [f"| {b} | {r['us']:.0f} us |" for b, r in rows["dp"].items()]
    r = rows["search"]
    lines += ["", f"Whole search ({r['data']}, iPNDM teacher, 256 samples, 61 points, 5 steps, uncached): "
              f"{r['total_s']:.1f} s, of which {r['denoiser_s']:.1f} s in the denoiser; everything else "
              f"(solver steps, cost matrix, DP, fingerprint) {100 * r['other_fraction']:.1f}%."]
    atomic_write_text(out / "gits.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
