"""Adapters: oracle models with known outputs, checked in float64."""

import pytest
import torch

import geosample as gs
from geosample.denoisers.adapters import CFGDenoiser, EDMDenoiser, EpsDenoiser, vp_to_denoised

ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _problem(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
    n = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.3, 60.0], dtype=torch.float64)[:batch]
    return x0, n, sigma


class Oracle(torch.nn.Module):
    """A VP model that knows x0 and n: returns eps, v or x0 exactly, checking its inputs."""

    def __init__(self, x0, n, sigma, kind, wrap):
        super().__init__()
        self.x0, self.n, self.sigma, self.kind, self.wrap = x0, n, sigma, kind, wrap
        self.seen = []

    def forward(self, x_vp, t, scale=1.0):
        self.seen.append((x_vp, t, scale))
        a = (1 / (1 + self.sigma ** 2)).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(x_vp, a.sqrt() * self.x0 + (1 - a).sqrt() * self.n, rtol=1e-13, atol=1e-13)
        out = {"epsilon": self.n, "v_prediction": a.sqrt() * self.n - (1 - a).sqrt() * self.x0,
               "sample": self.x0}[self.kind] * scale
        if self.wrap == "object":
            return type("Out", (), {"sample": out})()
        return (out,) if self.wrap == "tuple" else out


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("wrap", ["tensor", "tuple", "object"])
def test_eps_denoiser_recovers_x0(kind, wrap):
    x0, n, sigma = _problem()
    model = Oracle(x0, n, sigma, kind, wrap)
    D = EpsDenoiser(model, ALPHAS, prediction_type=kind)
    torch.testing.assert_close(D(x0 + sigma.reshape(-1, 1, 1, 1) * n, sigma), x0, rtol=1e-12, atol=1e-12)
    t = model.seen[0][1]
    assert t.dtype == torch.float64 and t.shape == (3,)
    torch.testing.assert_close(gs.schedules.timestep_to_sigma(t, ALPHAS), sigma.clamp(max=gs.schedules.discrete_sigmas(ALPHAS)[-1]))


def test_timestep_is_log_sigma_interpolation():
    sig = gs.schedules.discrete_sigmas(ALPHAS)
    seen = []
    D = EpsDenoiser(lambda x, t: seen.append(t) or torch.zeros_like(x), ALPHAS)
    s = torch.stack([sig[10], (sig[500] * sig[501]).sqrt(), sig[999]])
    D(torch.zeros(3, 2, dtype=torch.float64), s)
    torch.testing.assert_close(seen[0], torch.tensor([10.0, 500.5, 999.0], dtype=torch.float64), rtol=0, atol=1e-9)
    D(torch.zeros(3, 2), s.float())
    assert seen[1].dtype == torch.float32


def test_model_kwargs_learned_variance_and_float_sigma():
    x0, n, sigma = _problem(batch=1)
    model = Oracle(x0, n, sigma, "epsilon", "tensor")
    D = EpsDenoiser(lambda x, t, **kw: torch.cat([model(x, t, **kw), 7 + x], 1), ALPHAS, model_kwargs={"scale": 2.0})
    out = D(x0 + float(sigma) * n, float(sigma), scale=3.0)
    torch.testing.assert_close(out, x0 + float(sigma) * n - 3.0 * float(sigma) * n)
    assert model.seen[0][2] == 3.0


def test_vp_to_denoised_formulas():
    x, out = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    s = torch.tensor([0.5, 4.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(vp_to_denoised(out, x, s.flatten(), "epsilon"), x - s * out)
    torch.testing.assert_close(vp_to_denoised(out, x, s.flatten(), "v_prediction"),
                               x / (1 + s ** 2) - s / (1 + s ** 2).sqrt() * out)
    with pytest.raises(ValueError, match="prediction_type"):
        vp_to_denoised(out, x, 1.0, "flow")
    with pytest.raises(ValueError, match="shape"):
        vp_to_denoised(out[:, :3], x, 1.0)


def test_edm_denoiser_runs_like_the_net(gmm, noise):
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64)

    def net(x, sigma, class_labels):
        assert sigma.shape == (x.shape[0],) and class_labels.shape == (x.shape[0], 2)
        return gmm(x, sigma) + 1e-3 * class_labels[:, :1]

    sigmas = gs.schedules.polynomial(6)
    got = gs.sample(EDMDenoiser(net, class_labels=labels), noise, sigmas, "heun")
    want = gs.sample(lambda x, s: gmm(x, s) + 1e-3, noise, sigmas, "heun")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="class_labels has batch"):
        EDMDenoiser(net, class_labels=labels.repeat(3, 1))(noise, 1.0)
    with pytest.raises(TypeError, match="callable"):
        EDMDenoiser(3)


def test_cfg_is_one_batched_call():
    calls = []

    def model(x, sigma, c):
        calls.append((x.shape[0], sigma.shape[0], c.shape[0]))
        return x * c[:, :1, None] + sigma[:, None, None]

    x = torch.randn(3, 2, 2, dtype=torch.float64)
    cond, uncond = torch.tensor([[2.0]] * 3, dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    D = CFGDenoiser(model, cond, uncond, scale=4.0)
    out = D(x, torch.full((3,), 0.7, dtype=torch.float64))
    assert calls == [(6, 6, 6)]
    d_u, d_c = 0.5 * x + 0.7, 2.0 * x + 0.7
    torch.testing.assert_close(out, d_u + 4.0 * (d_c - d_u))


def test_cfg_with_keyword_conditioning():
    x0, n, sigma = _problem(batch=2)
    emb_c, emb_u = torch.full((1, 4), 3.0, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    inner = EpsDenoiser(lambda x, t, emb: emb[:, :1, None, None] * x, ALPHAS)
    D = CFGDenoiser(inner, {"emb": emb_c}, {"emb": emb_u}, scale=1.5)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * n
    s = sigma.reshape(-1, 1, 1, 1)
    d_u, d_c = x, x - s * 3.0 * x / (1 + s ** 2).sqrt()
    torch.testing.assert_close(D(x, sigma), d_u + 1.5 * (d_c - d_u))
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(inner, {"emb": emb_c}, {"e": emb_u}, 1.0)
    with pytest.raises(TypeError, match="both"):
        CFGDenoiser(inner, {"emb": emb_c}, emb_u, 1.0)


def test_bad_alphas():
    with pytest.raises(ValueError, match="decreasing"):
        EpsDenoiser(lambda x, t: x, ALPHAS.flip(0))
    with pytest.raises(ValueError, match="prediction_type"):
        EpsDenoiser(lambda x, t: x, ALPHAS, prediction_type="x0")


def test_batch_one_keywords_are_broadcast():
    seen = []
    D = EpsDenoiser(lambda x, t, emb, flag: seen.append((emb.shape, flag)) or torch.zeros_like(x), ALPHAS,
                    model_kwargs={"emb": torch.ones(1, 7)})
    D(torch.zeros(4, 2), torch.ones(4), flag=torch.tensor(True))
    assert seen == [(torch.Size([4, 7]), torch.tensor(True))]
