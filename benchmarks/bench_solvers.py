"""Solver latency: one step per solver, whole sampling loops, and solver overhead vs plain torch.

The denoiser is trivial, the exact one for N(0, I) data, D(x, sigma) = x / (1 + sigma^2), so the
time measured is the solver's own (step maths, history, bookkeeping), not a network's.

groups:
    solver-step      one step (sigma 1.0 -> 0.5) through gs.sample, per solver
    sampling-loop    10 steps on the polynomial rho=7 schedule, per solver
    overhead-<name>  gs.sample vs the same solver written the k-diffusion way (plain torch,
                     sigmas a tensor, d = to_d(x, sigma, denoised), x = x + d * dt), at
                     x [4, 3, 32, 32] and [1, 4, 64, 64] (euler, heun, dpm2, ipndm, dpmpp 2M)

Run: ``PYTHONPATH=. pytest benchmarks/bench_solvers.py --benchmark-enable --benchmark-only`` (CI: disabled, pyproject);
``GEOSAMPLE_BENCH_FULL=1`` uses x of shape [64, 3, 32, 32] instead of [4, 3, 32, 32].
"""
import os

import pytest
import torch

import geosample as gs

FULL = os.environ.get("GEOSAMPLE_BENCH_FULL") == "1"
SHAPE = (64 if FULL else 4, 3, 32, 32)
SOLVERS = ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "dpmpp", "unipc", "deis")
STEPS = 10
AB4 = (55 / 24, -59 / 24, 37 / 24, -9 / 24)


def gaussian_denoiser(x, sigma):
    """Exact denoiser of N(0, I) data: E[x0 | x] = x / (1 + sigma^2); sigma a float or [B]."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return x / (1 + s * s)


def rel_rms(x, exact):
    """|x - exact|_2 / |exact|_2."""
    return float((x - exact).norm() / exact.norm())


@pytest.fixture(scope="module")
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def to_d(x, sigma, denoised):
    """k-diffusion's to_d: (x - denoised) / sigma with sigma broadcast over x."""
    return (x - denoised) / sigma.reshape(-1, *[1] * (x.dim() - 1))


@torch.no_grad()
def kdiff_euler(model, x, sigmas):
    """k-diffusion sample_euler (no churn)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i] * s_in, denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def kdiff_heun(model, x, sigmas):
    """k-diffusion sample_heun (no churn, sigmas ending above 0)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i] * s_in, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1] * s_in, model(x_2, sigmas[i + 1] * s_in))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def kdiff_ipndm(model, x, sigmas):
    """iPNDM the k-diffusion way (as in ComfyUI's sample_ipndm): a list of past directions."""
    s_in = x.new_ones([x.shape[0]])
    ds = []
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i] * s_in, model(x, sigmas[i] * s_in))
        ds = [d] + ds[:3]
        coeffs = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: AB4}[len(ds)]
        x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * dk for c, dk in zip(coeffs, ds))
    return x


@torch.no_grad()
def kdiff_dpm2(model, x, sigmas):
    """k-diffusion sample_dpm_2 (no churn, sigmas ending above 0): midpoint in log sigma."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i] * s_in, model(x, sigmas[i] * s_in))
        sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid * s_in, model(x_2, sigma_mid * s_in))
        x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def kdiff_dpmpp_2m(model, x, sigmas):
    """k-diffusion sample_dpmpp_2m (sigmas ending above 0): first order first, then 2M."""
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


KDIFF = {"euler": (kdiff_euler, {}), "heun": (kdiff_heun, {}), "dpm2": (kdiff_dpm2, {}), "ipndm": (kdiff_ipndm, {}),
         "dpmpp": (kdiff_dpmpp_2m, {"max_order": 2, "lower_order_final": False})}
OVERHEAD_SHAPES = ((4, 3, 32, 32), (1, 4, 64, 64))


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_step(benchmark, noise, solver):
    benchmark.group = "solver-step"
    sigmas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = benchmark(gs.sample, gaussian_denoiser, noise, sigmas, solver=solver)
    # exact flow for N(0, I) data: x_sigma = n sqrt(1 + sigma^2); one step errs ~5% (order 1), ~1% (order 2)
    assert rel_rms(x, noise * ((1 + 0.25) / (1 + 1.0)) ** 0.5) < 0.06


@pytest.mark.parametrize("solver", SOLVERS)
def test_sampling_loop(benchmark, noise, solver):
    benchmark.group = "sampling-loop"
    sigmas = gs.schedules.polynomial(STEPS)
    x = benchmark(gs.sample, gaussian_denoiser, noise, sigmas, solver=solver)
    assert rel_rms(x, noise * 80.0 * ((1 + 0.002 ** 2) / (1 + 80.0 ** 2)) ** 0.5) < 0.3


@pytest.mark.parametrize("impl", ["geosample", "kdiffusion"])
@pytest.mark.parametrize("shape", OVERHEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("solver", sorted(KDIFF))
def test_overhead(benchmark, solver, shape, impl):
    benchmark.group = f"overhead-{solver}-{'x'.join(map(str, shape))}"
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigmas = gs.schedules.polynomial(STEPS)
    loop, options = KDIFF[solver]
    if impl == "geosample":
        x = benchmark(gs.sample, gaussian_denoiser, noise, sigmas, solver=solver, **options)
    else:
        s32 = sigmas.to(noise.dtype)
        x = benchmark(loop, gaussian_denoiser, noise * s32[0], s32)
    ref = gs.sample(gaussian_denoiser, noise.double(), sigmas, solver=solver, **options)
    torch.testing.assert_close(x.double(), ref, atol=1e-4, rtol=1e-4)   # the same solver both ways
