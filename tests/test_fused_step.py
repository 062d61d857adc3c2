"""Fused solver steps: the update against float64 maths for every solver's coefficient pattern,
the ring buffer, the fused sampler against gs.sample, and the Triton kernel (compiled on CUDA,
TRITON_INTERPRET=1 on CPU)."""
import math
import importlib.util
import textwrap

import pytest
import torch

import geosample as gs
from geosample.solvers.fused_sampler import FusedSampler, plan, sample_fused
from geosample.solvers import fused
from triton_script import run_triton_script

SOLVERS = ["euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc"]
EPS32 = torch.finfo(torch.float32).eps


def lincomb(coeffs, tensors):
    """The unfused combination sum_k c_k t_k, one temporary per term (what solvers did before fusion)."""
    return sum(float(c) * t for c, t in zip(coeffs, tensors))


def _case(op, K, shape=(3, 5, 7), dtype=torch.float32, seed=0):
    """Random x, y, D and a full history of K entries."""
    g = torch.Generator().manual_seed(seed)
    x, y, d = (80 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    hist = torch.randn((K, *shape), generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, y, d, hist)]


def _reference(op, x, y, d, hist, slot, new):
    """float64 a x + sum_k c_k H_k from float32 inputs, and the bound 4 eps32 (|a x| + sum |c_k H_k|)."""
    x, y, d, hist = (t.double() for t in (x, y, d, hist))
    K = hist.shape[0]
    hs = [hist[(slot - k) % K] for k in range(len(op.coeffs))]
    if new:
        hs[0] = d if op.sigma is None else (y - d) / op.sigma
    terms = [op.a * x] + [c * h for c, h in zip(op.coeffs, hs)]
    return sum(terms), 4 * EPS32 * sum(t.abs() for t in terms) + 1e-30, hs[0]


def _patterns():
    sig = gs.schedules.polynomial(8, 0.002, 80.0)
    for solver in SOLVERS:
        ops, K = plan(solver, sig)
        for j, op in enumerate(ops):
            yield pytest.param(op, K, id=f"{solver}-{j}")


@pytest.mark.parametrize("op, K", list(_patterns()))
def test_update_matches_float64_and_unfused(op, K):
    x, y, d, hist = _case(op, K)
    slot, new = 1 % K, op.eval_sigma is not None
    want, bound, h_new = _reference(op, x, y, d, hist, slot, new)
    unfused_hs = [hist[(slot - k) % K] for k in range(len(op.coeffs))]
    if new:
        unfused_hs[0] = d if op.sigma is None else (y - d) / op.sigma
    unfused = op.a * x + lincomb(op.coeffs, unfused_hs)
    got = fused.update(x, hist, slot, op.coeffs, a=op.a, denoised=d if new else None,
                       sigma=op.sigma if new else None, at=y)
    assert got.dtype == torch.float32
    assert bool(((got.double() - want).abs() <= bound).all())
    assert bool(((unfused.double() - want).abs() <= bound).all())  # the bound is tight enough for both
    if new:
        assert torch.allclose(hist[slot].double(), h_new, rtol=4 * EPS32, atol=0)


def test_update_bound_can_fail():
    ops, K = plan("ipndm", gs.schedules.polynomial(8))
    op = ops[5]
    x, y, d, hist = _case(op, K)
    want, bound, _ = _reference(op, x, y, d, hist, 1, True)
    wrong = fused.update(x, hist, 1, op.coeffs[:-1] + (op.coeffs[-1] * (1 + 1e-4),), denoised=d, sigma=op.sigma)
    assert not bool(((wrong.double() - want).abs() <= bound).all())


def test_update_in_place_and_float64():
    x, y, d, hist = _case(None, 3, dtype=torch.float64)
    want = 0.5 * x + 2.0 * (x - d) / 7.0 - 1.5 * hist[1]
    out = fused.update(x, hist, 2, (2.0, -1.5), a=0.5, denoised=d, sigma=7.0, out=x)
    assert out is x
    torch.testing.assert_close(x, want, rtol=1e-14, atol=1e-12)


def test_history_ring_matches_list():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(9)]
    hist, past = fused.History(xs[0], 3), []
    for i, m in enumerate(xs):
        past = [m] + past[:2]
        coeffs = [0.3 * (k + 1) for k in range(len(past))]
        got = hist.update(xs[0], coeffs, a=0.9, denoised=m)
        torch.testing.assert_close(got, 0.9 * xs[0] + lincomb(coeffs, past), rtol=1e-14, atol=1e-14)
        combine_only = hist.update(xs[0], coeffs[:1])  # no push: the newest entry is still m
        torch.testing.assert_close(combine_only, xs[0] + 0.3 * m, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("bad, match", [
    (dict(coeffs=(1.0, 2.0, 3.0, 4.0, 5.0)), "coefficients"),
    (dict(slot=3), "slot"),
    (dict(denoised=torch.zeros(2, 2)), "denoised must match"),
    (dict(sigma=1.0), "sigma is only used"),
    (dict(backend="cuda"), "backend"),
])
def test_update_rejects_bad_input(bad, match):
    x = torch.zeros(2, 3)
    args = dict(coeffs=(1.0,), slot=0, backend="auto") | bad
    with pytest.raises(ValueError, match=match):
        fused.update(x, torch.zeros(3, 2, 3), args.pop("slot"), args.pop("coeffs"), **args)


def test_history_rejects_too_many_coefficients():
    hist = fused.History(torch.zeros(2), 4)
    with pytest.raises(ValueError, match="only 1 history"):
        hist.update(torch.zeros(2), (1.0, 2.0), denoised=torch.zeros(2))
    with pytest.raises(ValueError, match="history size"):
        fused.History(torch.zeros(2), 5)


@pytest.mark.parametrize("solver, options", [(s, {}) for s in SOLVERS] + [
    ("ipndm", {"max_order": 2}), ("dpmpp", {"thresholding": True, "lower_order_final": False}),
    ("unipc", {"variant": "bh1", "max_order": 2}), ("dpm2", {"r": 0.3})])
@pytest.mark.parametrize("afs", [False, True])
def test_sampler_matches_sample_float64(gmm, noise, solver, options, afs):
    for sig in (gs.schedules.polynomial(7, 0.01, 80.0),
                torch.cat([gs.schedules.logsnr(5, 0.02, 80.0), torch.zeros(1, dtype=torch.float64)])):
        want = gs.sample(gmm, noise, sig, solver=solver, afs=afs, **options)
        got = sample_fused(gmm, noise, sig, solver, afs=afs, **options)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sampler_matches_sample_float32(gmm, noise, solver):
    sig = gs.schedules.polynomial(10, 0.002, 80.0)
    den = lambda x, s: gmm(x.double(), s.double()).float()  # noqa: E731
    want = gs.sample(gmm, noise, sig, solver=solver)  # float64 truth
    got = FusedSampler(den, noise.float(), sig, solver)(noise.float())
    ref32 = gs.sample(den, noise.float(), sig, solver=solver)
    err, err_unfused = (got.double() - want).abs().max(), (ref32.double() - want).abs().max()
    assert err <= 4 * err_unfused + 1e-4  # float32 rounding of the same size as the unfused path
    torch.testing.assert_close(got, ref32, rtol=1e-4, atol=1e-4)


def test_sampler_is_reusable_and_checks_shape(gmm, noise):
    sig = gs.schedules.polynomial(6, 0.01, 80.0)
    sampler = FusedSampler(gmm, noise, sig, "dpmpp")
    a, b = sampler(noise), sampler(2 * noise)
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, gs.sample(gmm, noise, sig, solver="dpmpp"), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="noise must match"):
        sampler(noise[:2])
    with pytest.raises(ValueError, match="graph=True needs a CUDA"):
        FusedSampler(gmm, noise, sig, "dpmpp", graph=True)
    with pytest.raises(ValueError, match="backend"):
        FusedSampler(gmm, noise, sig, "dpmpp", backend="cuda")
    with pytest.raises(TypeError, match="unknown options"):
        FusedSampler(gmm, noise, sig, "euler", max_order=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("solver", ["ipndm", "dpmpp", "unipc", "heun"])
def test_graph_capture_matches_sample_cuda(solver):
    g = torch.Generator().manual_seed(5)
    noise, mu = torch.randn(64, 6, generator=g).cuda(), torch.randn(6, generator=g).cuda()
    den = lambda x, s: (x + s[:, None] ** 2 * mu) / (1 + s[:, None] ** 2)  # noqa: E731  N(mu, I), capturable
    sig = gs.schedules.polynomial(8, 0.002, 80.0)
    sampler = FusedSampler(den, noise, sig, solver, graph=True)
    want = gs.sample(den, noise, sig, solver=solver)
    torch.testing.assert_close(sampler(noise), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sampler(2 * noise), gs.sample(den, 2 * noise, sig, solver=solver), rtol=1e-4, atol=1e-4)


TRITON_CHECK = textwrap.dedent("""
    import torch, geosample as gs
    from geosample.solvers.fused_sampler import plan, sample_fused
    from geosample.solvers import fused
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sig = gs.schedules.polynomial(8, 0.002, 80.0)
    g = torch.Generator().manual_seed(0)
    n = 0
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        for solver in %r:
            ops, K = plan(solver, sig)
            for j, op in enumerate(ops):
                x, y, d = (80 * torch.randn(2000, generator=g, dtype=dtype).to(dev) for _ in range(3))
                hist = torch.randn(K, 2000, generator=g, dtype=dtype).to(dev)
                h2 = hist.clone()
                new = op.eval_sigma is not None
                kw = dict(a=op.a, denoised=d if new else None, sigma=op.sigma if new else None, at=y)
                want = fused.update(x, hist, 1 %% K, op.coeffs, backend="torch", **kw)
                got = fused.update(x, h2, 1 %% K, op.coeffs, backend="triton", **kw)
                scale = op.a * x.abs() + sum(abs(c) for c in op.coeffs) * hist.abs().amax(0) + abs(op.a)
                assert bool(((got - want).abs() <= tol * scale).all()), (dtype, solver, j)
                torch.testing.assert_close(h2, hist, rtol=tol, atol=0)
                n += 1
    means = torch.randn(3, 6, generator=g, dtype=torch.float64)
    gmm = gs.GaussianMixtureDenoiser(means.to(dev), [0.3, 0.5, 0.2])
    noise = torch.randn(5, 6, generator=g, dtype=torch.float64).to(dev)
    for solver in %r:
        want = gs.sample(gmm, noise, sig, solver=solver)
        got = sample_fused(gmm, noise, sig, solver, backend="triton")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    print("OK", n)
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_torch_path():
    run_triton_script(TRITON_CHECK % (SOLVERS, SOLVERS), "OK")


def test_sampler_names_the_step_of_a_nan(noise):
    sig = gs.schedules.polynomial(6, 0.01, 80.0)

    def nan_at_step_2(x, s):
        return x / (1 + s[:, None] ** 2) * (math.nan if float(s[0]) == float(sig[2]) else 1.0)

    with pytest.raises(FloatingPointError, match="step 2 "):
        sample_fused(nan_at_step_2, noise, sig, "ipndm")


@pytest.mark.parametrize("solver", ["euler", "dpmpp", "unipc", "heun"])
def test_sampler_infinite_start_and_half_precision(noise, solver):
    mu = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)

    def den(x, s):
        s = s[:, None].to(x.dtype)
        return torch.where(torch.isinf(s), mu.to(x.dtype), (x + s * s * mu.to(x.dtype)) / (1 + s * s))

    sig = torch.cat([torch.tensor([math.inf], dtype=torch.float64), gs.schedules.polynomial(6, 0.01, 50.0),
                     torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sample_fused(den, noise, sig, solver), gs.sample(den, noise, sig, solver=solver),
                               rtol=1e-12, atol=1e-12)
    half = noise.to(torch.float16)
    got = sample_fused(den, half, sig, solver)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, gs.sample(den, half, sig, solver=solver), rtol=1e-3, atol=1e-3)
