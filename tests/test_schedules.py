import math

import pytest
import torch

import geosample as gs
from geosample import schedules as S

FAMILIES = {
    "polynomial": lambda n, lo, hi: S.polynomial(n, lo, hi, rho=7.0),
    "polynomial_rho3": lambda n, lo, hi: S.polynomial(n, lo, hi, rho=3.0),
    "logsnr": lambda n, lo, hi: S.logsnr(n, lo, hi),
    "time_uniform": lambda n, lo, hi: S.time_uniform(n, lo, hi),
    "time_uniform_rho2": lambda n, lo, hi: S.time_uniform(n, lo, hi, rho=2.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps", [1, 2, 5, 60])
def test_endpoints_monotone_float64(family, steps):
    s = FAMILIES[family](steps, 0.002, 80.0)
    assert s.dtype == torch.float64 and s.shape == (steps + 1,)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002
    assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(gs.schedules.check_sigmas(s), s, rtol=0, atol=0)


def test_polynomial_matches_formula():
    i = torch.arange(11, dtype=torch.float64)
    rho, lo, hi = 7.0, 0.002, 80.0
    want = (hi ** (1 / rho) + i / 10 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    torch.testing.assert_close(S.polynomial(10), want, rtol=1e-14, atol=0)


def test_logsnr_uniform_in_log_sigma():
    lam = -S.logsnr(12).log()
    diffs = lam[1:] - lam[:-1]
    torch.testing.assert_close(diffs, torch.full_like(diffs, diffs.mean().item()), rtol=1e-12, atol=0)


def test_time_uniform_uniform_in_vp_time():
    beta_d, beta_min = S.vp_params(0.002, 80.0)
    t = S.vp_sigma_inv(S.time_uniform(9), beta_d, beta_min)
    want = torch.linspace(1.0, S.VP_EPS, 10, dtype=torch.float64)
    torch.testing.assert_close(t, want, rtol=1e-12, atol=1e-12)


def test_vp_edm_round_trips():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    # 1 - alpha cancels at small sigma: ~eps / sigma^2 relative error is inherent
    torch.testing.assert_close(S.alpha_to_sigma(S.sigma_to_alpha(sigma)), sigma, rtol=1e-9, atol=0)
    beta_d, beta_min = S.vp_params()
    torch.testing.assert_close(S.vp_sigma(S.vp_sigma_inv(sigma, beta_d, beta_min), beta_d, beta_min),
                               sigma, rtol=1e-12, atol=0)


def _linear_alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_discrete_schedule_hits_model_sigmas():
    ac = _linear_alphas_cumprod()
    model = S.discrete_sigmas(ac)
    s = S.discrete(999, ac)  # every integer timestep
    torch.testing.assert_close(s, model.flip(0), rtol=1e-12, atol=0)
    s10 = S.discrete(10, ac, rho=2.0)
    assert s10[0].item() == pytest.approx(model[-1].item()) and s10[-1].item() == pytest.approx(model[0].item())
    assert bool((s10[1:] < s10[:-1]).all())


def test_timestep_sigma_inverse():
    ac = _linear_alphas_cumprod()
    t = torch.tensor([0.0, 0.5, 10.25, 500.7, 999.0], dtype=torch.float64)
    torch.testing.assert_close(S.sigma_to_timestep(S.timestep_to_sigma(t, ac), ac), t, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: S.polynomial(0), ValueError, "steps"),
    (lambda: S.polynomial(2.5), TypeError, "steps"),
    (lambda: S.logsnr(5, sigma_min=1.0, sigma_max=1.0), ValueError, "sigma_min must be < sigma_max"),
    (lambda: S.polynomial(5, sigma_min=-1.0), ValueError, "sigma_min must be > 0"),
    (lambda: S.polynomial(5, rho=0.0), ValueError, "rho"),
    (lambda: S.time_uniform(5, rho=-1.0), ValueError, "rho"),
    (lambda: S.polynomial(5, sigma_max=math.nan), ValueError, "finite"),
    (lambda: S.discrete(5, torch.tensor([0.9, 0.95])), ValueError, "decreasing"),
    (lambda: S.check_sigmas([80.0]), ValueError, "at least 2"),
    (lambda: S.check_sigmas([80.0, 90.0]), ValueError, "decreasing"),
    (lambda: S.check_sigmas([80.0, 1.0, 1.0]), ValueError, "decreasing"),
    (lambda: S.check_sigmas([80.0, -1.0]), ValueError, "positive"),
    (lambda: S.check_sigmas([80.0, math.nan]), ValueError, "finite"),
    (lambda: S.check_sigmas([[80.0, 1.0]]), ValueError, "1-D"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_trailing_zero_allowed():
    s = S.check_sigmas([80.0, 1.0, 0.0])
    assert s[-1].item() == 0.0


def test_too_many_steps_for_the_range_is_an_error_not_a_flat_schedule():
    """polynomial(10**7, 1, 1 + 1e-9) was returned with repeated sigmas."""
    with pytest.raises(ValueError, match="not strictly decreasing in float64"):
        gs.schedules.polynomial(10 ** 7, 1.0, 1.0 + 1e-9)
    with pytest.raises(ValueError, match="not strictly decreasing in float64"):
        gs.schedules.logsnr(10 ** 6, 1.0, 1.0 + 1e-12)


def test_huge_sigma_max_is_a_clear_error_or_a_valid_schedule():
    """time_uniform(5, 0.002, 1e308) raised a raw OverflowError."""
    with pytest.raises(ValueError, match="not finite in float64"):
        gs.schedules.time_uniform(5, 0.002, 1e308)
    s = gs.schedules.time_uniform(5, 0.002, 1e150)
    assert s[0] == 1e150 and bool((s[1:] < s[:-1]).all())
    assert gs.schedules.polynomial(5, 0.002, 1e308)[0] == 1e308
    with pytest.raises(ValueError, match="overflows float64"):       # found by tests/test_fuzz.py
        gs.schedules.polynomial(1, 1.0, 1.3407807929942597e154, rho=0.5)


def test_check_sigmas_errors_stay_short_on_long_schedules():
    """One duplicate in a 1e6-entry schedule gave a 19 MB message."""
    s = torch.cat([torch.linspace(1e6, 2.0, 10 ** 6, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"sigma\[999999\] = 2.0 then sigma\[1000000\] = 2.0") as e:
        gs.schedules.check_sigmas(s)
    assert len(str(e.value)) < 300
    s[5] = float("nan")
    with pytest.raises(ValueError, match=r"sigma\[5\] = nan") as e:
        gs.schedules.check_sigmas(s)
    assert len(str(e.value)) < 300
    with pytest.raises(ValueError, match="meta tensor"):
        gs.schedules.check_sigmas(torch.ones(3, device="meta"))


def test_by_name_is_the_family():
    assert torch.equal(S.by_name("polynomial", 5, rho=3.0), S.polynomial(5, rho=3.0))
    assert torch.equal(S.by_name("logsnr", 4, sigma_min=0.01, sigma_max=10.0), S.logsnr(4, 0.01, 10.0))
    assert torch.equal(S.by_name("time_uniform", 6), S.time_uniform(6))
    ac = torch.linspace(0.999, 0.01, 100, dtype=torch.float64)
    assert torch.equal(S.by_name("discrete", 4, alphas_cumprod=ac, rho=2.0), S.discrete(4, ac, rho=2.0))
    assert set(S.FAMILIES) == {"polynomial", "logsnr", "time_uniform", "discrete"}
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid: polynomial"):
        S.by_name("cosine", 4)
    with pytest.raises(TypeError, match="schedule 'logsnr' takes sigma_min, sigma_max; got rho"):
        S.by_name("logsnr", 4, rho=7.0)
