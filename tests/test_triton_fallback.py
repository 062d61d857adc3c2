"""The safe fallback: a Triton kernel that fails to compile or launch warns once and its torch path
runs instead (same result); GEOSAMPLE_STRICT_TRITON=1 makes the failure an error.  The failure is
forced by replacing the kernel launcher with one that raises, so these run on CPU."""
import warnings

import pytest
import torch

import geosample as gs
from geosample import kernels
from geosample.solvers import fused


class CompileFailure(RuntimeError):
    """Stands in for triton's CompilationError / a CUDA launch error."""


def _raise(*args, **kwargs):
    raise CompileFailure("ptxas fatal: forced failure")


@pytest.fixture(autouse=True)
def fresh_fallbacks(monkeypatch):
    """Every test starts with no kernel on its fallback path and without the strict switch."""
    monkeypatch.setattr(kernels, "_FAILED", {})
    monkeypatch.delenv(kernels.STRICT_ENV, raising=False)


def _step_inputs():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    hist = torch.randn(3, 3, 5, 5, generator=g, dtype=torch.float64)
    return x, d, hist


def _step(backend, x, d, hist):
    return fused.update(x, hist, 1, [0.5, -0.25, 0.125], a=0.9, denoised=d, sigma=2.0, backend=backend)


def test_solver_step_falls_back_to_torch_once(monkeypatch):
    monkeypatch.setattr(kernels, "fused_update", _raise)
    x, d, hist = _step_inputs()
    ref_hist = hist.clone()
    want = _step("torch", x, d, ref_hist)
    with pytest.warns(RuntimeWarning, match="'solver_step' failed.*forced failure"):
        got = _step("triton", x, d, hist)
    assert torch.equal(got, want) and torch.equal(hist, ref_hist)
    assert "CompileFailure" in kernels.fallback_kernels()["solver_step"]
    monkeypatch.setattr(kernels, "fused_update", lambda *a: pytest.fail("a failed kernel is not retried"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # the warning is given once
        assert torch.equal(_step("triton", x, d, hist), _step("torch", x, d, ref_hist))


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setattr(kernels, "fused_update", _raise)
    monkeypatch.setenv(kernels.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match="GEOSAMPLE_STRICT_TRITON=1.*forced failure"):
        _step("triton", *_step_inputs())
    assert kernels.fallback_kernels() == {}


@pytest.mark.parametrize("error", [ValueError("bad shape"), TypeError("bad dtype")])
def test_bad_input_is_not_swallowed(monkeypatch, error):
    def launcher(*args):
        raise error
    monkeypatch.setattr(kernels, "fused_update", launcher)
    with pytest.raises(type(error), match=str(error)):
        _step("triton", *_step_inputs())
    assert kernels.fallback_kernels() == {}


def test_run_with_fallback_is_per_kernel():
    """The hook the KDE uses: each name falls back on its own, arguments reach both paths."""
    with pytest.warns(RuntimeWarning, match="'kde'"):
        assert kernels.run_with_fallback("kde", _raise, lambda a, b=0: a + b, 2, b=3) == 5
    assert kernels.run_with_fallback("other", lambda a: a * 10, _raise, 2) == 20
    assert set(kernels.fallback_kernels()) == {"kde"}


@pytest.mark.parametrize("metric", ["l1", "l2", "dev"])
def test_gits_cost_falls_back_to_torch(monkeypatch, metric):
    pytest.importorskip("triton")
    from geosample.gits import cost
    from geosample.kernels import gits_cost
    monkeypatch.setattr(cost, "triton_available", lambda: True)  # as on a CUDA machine
    monkeypatch.setattr(gits_cost, "pair_sums", _raise)
    monkeypatch.setattr(gits_cost, "dev_moments", _raise)
    g = torch.Generator().manual_seed(0)
    grid = gs.schedules.polynomial(6)
    y = torch.randn(7, 4, 10, generator=g, dtype=torch.float64)
    x = y + grid[:, None, None] * torch.randn(4, 10, generator=g, dtype=torch.float64)
    traj = gs.Trajectory(x=x, denoised=y[:-1], sigmas=grid, nfe=6)
    with pytest.warns(RuntimeWarning, match="'gits_(pair|moment)' failed"):
        got = gs.gits.cost_matrix(traj, metric, backend="triton")
    assert torch.equal(got, gs.gits.cost_matrix(traj, metric, backend="torch"))


def _kde_case(monkeypatch, d, **options):
    """(KDE on triton with both KDE kernels forced to fail, the same on the cpu backend, queries);
    chunk_size 64: several ranges, so every range takes the fallback after the one warning."""
    pytest.importorskip("triton")
    from geosample.kernels import kde_triton
    monkeypatch.setattr(kernels, "triton_available", lambda: True)      # as on a CUDA machine
    monkeypatch.setattr(kde_triton, "_fused_partial", _raise)
    monkeypatch.setattr(kde_triton, "_range_partial", _raise)
    g = torch.Generator().manual_seed(3)
    y = torch.rand(300, d, generator=g) * 2 - 1
    x = y[:5] + 0.3 * torch.randn(5, d, generator=g)
    kw = dict(chunk_size=64, **options)
    return gs.KDEDenoiser(y, backend="triton", **kw), gs.KDEDenoiser(y, backend="cpu", **kw), x


@pytest.mark.parametrize("storage", ["float32", "uint8"])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("d, name", [(16, "kde_fused"), (300, "kde_two_phase")])
def test_kde_falls_back_to_torch_per_kernel(monkeypatch, d, name, storage, precision):
    tri, cpu, x = _kde_case(monkeypatch, d, storage=storage, precision=precision)
    with pytest.warns(RuntimeWarning, match=f"'{name}' failed.*forced failure") as record:
        got, st = tri(x, [0.05, 0.3, 1.0, 5.0, 80.0], return_stats=True)
    assert len(record) == 1 and set(kernels.fallback_kernels()) == {name}
    want, sw = cpu(x, [0.05, 0.3, 1.0, 5.0, 80.0], return_stats=True)
    # the fallback streams range by range, the cpu backend in one pass: the same float32 terms summed
    # in another order (fast: bfloat16 products, no exact re-scoring)
    tol = 1e-6 if precision == "exact" else 1e-3
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(st.log_z, sw.log_z, rtol=tol, atol=0)
    assert torch.equal(st.argmax, sw.argmax)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # once per kernel, then silently the torch path
        torch.testing.assert_close(tri(x, 0.5), cpu(x, 0.5), rtol=tol, atol=tol)


def test_kde_strict_mode_raises(monkeypatch):
    tri, _, x = _kde_case(monkeypatch, 16)
    monkeypatch.setenv(kernels.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match="'kde_fused' failed.*GEOSAMPLE_STRICT_TRITON=1.*forced failure"):
        tri(x, 1.0)
    assert kernels.fallback_kernels() == {}


def test_fused_sampler_falls_back_to_torch(monkeypatch, gmm, noise):
    pytest.importorskip("triton")
    from geosample.solvers.fused_sampler import FusedSampler
    from geosample.kernels import solver_step
    monkeypatch.setattr(solver_step, "solver_step", _raise)
    sig = gs.schedules.polynomial(6)
    want = FusedSampler(gmm, noise, sig, "ipndm", backend="torch")(noise)
    with pytest.warns(RuntimeWarning, match="'solver_step' failed.*forced failure"):
        got = FusedSampler(gmm, noise, sig, "ipndm", backend="triton")(noise)
    assert torch.equal(got, want)
    monkeypatch.setenv(kernels.STRICT_ENV, "1")
    monkeypatch.setattr(kernels, "_FAILED", {})
    with pytest.raises(RuntimeError, match="GEOSAMPLE_STRICT_TRITON=1"):
        FusedSampler(gmm, noise, sig, "dpmpp", backend="triton")(noise)
