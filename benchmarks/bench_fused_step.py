"""One solver step: the fused update (geosample.solvers.fused) against the unfused torch path.

Run: ``PYTHONPATH=. pytest benchmarks/bench_fused_step.py --benchmark-enable --benchmark-only`` (CPU; CUDA cases run
when a GPU is present).  GEOSAMPLE_BENCH_FULL=1 uses batch 8 (3x64x64) and 4 (4x128x128) instead
of 1.  Steps measured: iPNDM order 4 (direction + 4 history terms) and DPM-Solver++ order 3.

    unfused     d = (x - D) / s;  ds = [d] + ds[:3];  x + lincomb(c, ds)   (geosample before fusion)
    kdiffusion  k-diffusion's LMS loop: ds.append(to_d(x, s, D)); x + sum(c * d for c, d in zip(c, reversed(ds)))
    fused       History.update(x, c, denoised=D, sigma=s)   (torch in place on CPU, one Triton kernel on CUDA)

On CUDA two larger batches are added (a step then moves 120-350 MB) and ``extra_info`` gets the
bytes a step must move (read x, D and the older history once, write x and the new entry once),
the achieved bandwidth, and its ratio to a device-to-device copy measured in the same process.

``test_loop`` times a whole 10-step solve (batch 1, or 1 and 8 with GEOSAMPLE_BENCH_FULL=1) with the
exact denoiser of N(0, I) data, D = x / (1 + sigma^2), so that the solver's own overhead dominates:
``gs.sample`` against :class:`geosample.solvers.fused_sampler.FusedSampler`, and on CUDA the same sampler captured
as one CUDA graph (``graph=True``), where per-launch overhead is what is left.
"""
import functools
import math
import os

import pytest
import torch

import geosample as gs
from geosample.solvers.fused_sampler import FusedSampler
from geosample.solvers import fused
from geosample.solvers.exponential import dpmpp_coefficients

FULL = os.environ.get("GEOSAMPLE_BENCH_FULL") == "1"
SHAPES = {"3x64x64": (8 if FULL else 1, 3, 64, 64), "4x128x128": (4 if FULL else 1, 4, 128, 128)}
# CUDA only: batches whose step moves 120-350 MB, so that bandwidth, not launch latency, bounds it
CUDA_SHAPES = {"3x64x64-b256": (256, 3, 64, 64), "4x128x128-b64": (64, 4, 128, 128)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL_SHAPES = {**SHAPES, **CUDA_SHAPES}
CASES = [(d, s) for d in DEVICES for s in (SHAPES if d == "cpu" else ALL_SHAPES)]
SIGMAS = gs.schedules.polynomial(10).tolist()
ORDER = 4
PATTERNS = {  # (a, coefficients newest first, direction?)
    "ipndm4": (1.0, tuple((SIGMAS[5] - SIGMAS[4]) * c for c in (55 / 24, -59 / 24, 37 / 24, -9 / 24)), True),
    "dpmpp3": (SIGMAS[5] / SIGMAS[4], tuple(dpmpp_coefficients(SIGMAS, 4, 3)), False),
}


def lincomb(coeffs, tensors):
    """The unfused combination sum_k c_k t_k, one temporary per term (what solvers did before fusion)."""
    return sum(float(c) * t for c, t in zip(coeffs, tensors))


def _tensors(shape, device):
    g = torch.Generator().manual_seed(0)
    x, D = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    return x, D, [torch.randn(shape, generator=g).to(device) for _ in range(ORDER)]


def _unfused(x, D, past, a, c, direction, s):
    h = (x - D) / s if direction else D
    ds = [h] + past[: len(c) - 1]
    return (x + lincomb(c, ds)) if a == 1.0 else a * x + lincomb(c, ds)


def _kdiffusion(x, D, past, a, c, direction, s):
    ds = list(reversed(past[: len(c) - 1]))
    ds.append((x - D) / s if direction else D)  # k-diffusion's to_d, then a list of directions
    return a * x + sum(coeff * d for coeff, d in zip(c, reversed(ds)))


def _step_fn(impl, x, D, past, pattern):
    a, c, direction = PATTERNS[pattern]
    s = SIGMAS[4] if direction else None
    if impl == "fused":
        hist = fused.History(x, ORDER)
        for h in reversed(past[: ORDER - 1]):
            hist.update(x, (0.0,), denoised=h)
        return lambda: hist.update(x, c, a=a, denoised=D, sigma=s)
    step = _unfused if impl == "unfused" else _kdiffusion
    return lambda: step(x, D, past, a, c, direction, SIGMAS[4])


def _min_bytes(x, order):
    """Read x, D and the order-1 older entries; write out and the new entry (y = x here)."""
    return x.numel() * x.element_size() * (2 + (order - 1) + 2)


@functools.lru_cache(maxsize=None)
def copy_roofline_gb_per_s() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy: the attainable HBM
    bandwidth, measured in this process (best of 10, CUDA events)."""
    src = torch.empty(2 ** 28, device="cuda")
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(11):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / best / 1e9


@pytest.mark.parametrize("device, shape", CASES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("impl", ["unfused", "kdiffusion", "fused"])
def test_step(benchmark, device, shape, pattern, impl):
    x, D, past = _tensors(ALL_SHAPES[shape], device)
    a, c, direction = PATTERNS[pattern]
    want = _unfused(x, D, past, a, c, direction, SIGMAS[4])
    torch.testing.assert_close(_step_fn(impl, x, D, past, pattern)(), want, rtol=1e-4, atol=1e-3)
    fn = _step_fn(impl, x, D, past, pattern)  # the fused ring keeps rotating: same work every call
    if device == "cuda":
        torch.cuda.synchronize()
        run = lambda: (fn(), torch.cuda.synchronize())[0]  # noqa: E731
    else:
        run = fn
    benchmark(run)
    benchmark.extra_info["numel"] = x.numel()
    benchmark.extra_info["min_bytes"] = _min_bytes(x, len(c))
    if device == "cuda" and benchmark.stats is not None:
        gb_per_s, roof = _min_bytes(x, len(c)) / benchmark.stats.stats.mean / 1e9, copy_roofline_gb_per_s()
        benchmark.extra_info.update(GB_per_s=gb_per_s, copy_GB_per_s=roof, vs_roofline=gb_per_s / roof,
                                    device_name=torch.cuda.get_device_name())


def unit_gaussian_denoiser(x, sigma):
    """The exact denoiser of N(0, I) data, D = x / (1 + sigma^2): cheap and CUDA-graph capturable."""
    return x / (1 + sigma.reshape(-1, *([1] * (x.dim() - 1))) ** 2)


LOOP_BATCHES = (1, 8) if FULL else (1,)
LOOP_IMPLS = ["sample", "fused"] + (["graph"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", LOOP_BATCHES)
@pytest.mark.parametrize("solver", ["ipndm", "unipc"])
@pytest.mark.parametrize("impl", LOOP_IMPLS)
def test_loop(benchmark, device, batch, solver, impl):
    if impl == "graph" and device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    noise = torch.randn((batch, 3, 64, 64), generator=torch.Generator().manual_seed(0)).to(device)
    sigmas = gs.schedules.polynomial(10)
    want = gs.sample(unit_gaussian_denoiser, noise, sigmas, solver=solver)
    if impl == "sample":
        fn = lambda: gs.sample(unit_gaussian_denoiser, noise, sigmas, solver=solver)  # noqa: E731
    else:
        sampler = FusedSampler(unit_gaussian_denoiser, noise, sigmas, solver, graph=impl == "graph")
        fn = lambda: sampler(noise)  # noqa: E731
    torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4)
    run = (lambda: (fn(), torch.cuda.synchronize())[0]) if device == "cuda" else fn
    benchmark(run)
    benchmark.extra_info.update(steps=len(sigmas) - 1, nfe=gs.nfe(solver, len(sigmas) - 1))
