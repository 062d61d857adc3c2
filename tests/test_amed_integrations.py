"""AMED in every entry point: GITSScheduler (diffusers), the k-diffusion-style samplers, ``geosample sample --amed``."""
import json
import math

import pytest
import torch

import geosample as gs
from geosample.integrations import kdiffusion as kd

R = [0.35, 0.6, 0.45, 0.55]
C = [1.01, 0.99, 1.0, 1.02]
A = [1.05, 0.95, 1.0, 1.02]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))


# ---- diffusers ------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
from geosample.denoisers.adapters import EpsDenoiser  # noqa: E402
from geosample.integrations.diffusers import GITSScheduler  # noqa: E402
from tiny_diffusers import one_thread, unet  # noqa: E402,F401  (fixtures)


def _latents(seed=3):
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def loop(unet, scheduler, latents, timesteps):
    with torch.no_grad():
        for t in timesteps:
            latents = scheduler.step(unet(latents, t).sample, t, latents).prev_sample
    return latents


def reference(unet, scheduler, x_vp, sigmas, amed):
    s0 = float(sigmas[0])
    noise = x_vp * math.sqrt(1 + s0 * s0) / s0
    denoiser = EpsDenoiser(unet, scheduler._finite_ac, scheduler.config.prediction_type)
    return gs.sample(denoiser, noise, sigmas, scheduler.config.solver, amed=amed)


@pytest.mark.parametrize("solver", ["amed", "euler", "dpm2", "ipndm", "dpmpp"])
def test_scheduler_runs_fixed_predictions(unet, solver):
    s = GITSScheduler(solver=solver, amed=gs.amed.Fixed(R, C, A).to_dict())
    s.set_timesteps(5)   # 4 intervals, then the final denoise
    assert s.order == 2 and len(s.timesteps) == 9
    x = _latents()
    got = loop(unet, s, x, s.timesteps)
    torch.testing.assert_close(got, reference(unet, s, x, s.sigmas, gs.amed.Fixed(R, C, A)), rtol=1e-4, atol=1e-4)


def test_scheduler_img2img_and_save(unet, tmp_path):
    s = GITSScheduler(solver="ipndm")
    s.use_amed(gs.amed.Fixed(R, C, A))
    s.set_timesteps(5)
    s.set_begin_index(2 * s.order)    # interval 2 of 4: the rest of the predictions
    x = _latents()
    got = loop(unet, s, x, s.timesteps[2 * s.order:])
    want = reference(unet, s, x, s.sigmas[2:], gs.amed.Fixed(R[2:], C[2:], A[2:]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    s.save_pretrained(tmp_path)
    loaded = GITSScheduler.from_pretrained(tmp_path)
    assert loaded.config.amed == gs.amed.Fixed(R, C, A).to_dict() and loaded.config.solver == "ipndm"
    loaded.set_timesteps(5)
    torch.testing.assert_close(loaded.timesteps, s.timesteps)
    with pytest.raises(ValueError, match="num_inference_steps=5"):
        loaded.set_timesteps(7)
    with pytest.raises(ValueError, match="AMED runs on the solvers"):
        GITSScheduler(solver="unipc", amed=gs.amed.Fixed(R).to_dict())
    with pytest.raises(ValueError, match="needs predictions"):
        GITSScheduler(solver="amed")


def test_scheduler_takes_a_predictor_as_its_mean(unet, gmm):
    sig = gs.schedules.polynomial(4, 0.002, 80.0)
    p = gs.amed.train(gmm, (6,), sig, solver="dpmpp", num_samples=8, batch_size=8, epochs=1, teacher_steps=8)
    s = GITSScheduler()
    s.use_amed(p)
    assert s.config.solver == "dpmpp" and s.config.amed == p.fixed().to_dict()
    q = gs.amed.train(gmm, (6,), sig, solver="dpmpp", num_samples=8, batch_size=8, epochs=1, teacher_steps=8,
                      max_order=2)
    s.use_amed(q)   # the predictor's own solver options (the scheduler's were dropped)
    assert s.config.solver_options["max_order"] == 2
    with pytest.raises(ValueError, match="trained for 'dpmpp', not 'ipndm'"):
        s.use_amed(q, solver="ipndm")
    a = gs.amed.train(gmm, (6,), sig, solver="dpmpp", num_samples=8, batch_size=8, epochs=1, teacher_steps=8,
                      afs=True)
    with pytest.raises(ValueError, match="afs=True"):
        s.use_amed(a)


def test_diffusers_unet_bottleneck_through_the_adapter(unet):
    """EpsDenoiser(unet, ...) exposes the UNet's mid_block: a predictor with bottleneck features trains
    and samples per sample with gs.sample."""
    s = GITSScheduler()
    denoiser = EpsDenoiser(unet, s._finite_ac)
    assert gs.amed.find_bottleneck(denoiser) is unet.mid_block
    sig = gs.schedules.polynomial(2, 0.05, 20.0)
    p = gs.amed.train(denoiser, (3, 8, 8), sig, solver="dpmpp", num_samples=4, batch_size=4, epochs=1,
                      teacher_steps=4)
    assert p.features == "bottleneck" and p.in_features == 16
    x = gs.sample(denoiser, _latents().expand(2, -1, -1, -1), sig, solver="dpmpp", amed=p)
    assert torch.isfinite(x).all()


# ---- k-diffusion ---------------------------------------------------------------------------------

def test_kdiffusion_samplers_take_amed(gmm, noise):
    sig = torch.cat([gs.schedules.polynomial(4, 0.01, 80.0), torch.zeros(1, dtype=torch.float64)])
    fixed = gs.amed.Fixed(R, C, A)
    seen = []
    got = kd.sample_amed(gmm, noise * 80.0, sig, callback=lambda info: seen.append(info["i"]), disable=True, amed=fixed)
    torch.testing.assert_close(got, gs.sample(gmm, noise, sig, solver="amed", amed=fixed), rtol=0, atol=0)
    assert seen == [0, 1, 2, 3, 4]
    got = kd.sample_dpmpp_2m(gmm, noise * 80.0, sig, disable=True, amed=fixed)
    want = gs.sample(gmm, noise, sig, solver="dpmpp", amed=fixed, max_order=2, lower_order_final=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kdiffusion_learned_predictor_checks_the_model(gmm, noise):
    sig = gs.schedules.polynomial(3, 0.01, 80.0)
    p = gs.amed.train(gmm, (6,), sig, solver="ipndm", num_samples=8, batch_size=8, epochs=1, teacher_steps=6)
    k_sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    got = kd.sample_ipndm(gmm, noise * 80.0, k_sig, disable=True, amed=p)
    torch.testing.assert_close(got, gs.sample(gmm, noise, k_sig, solver="ipndm", amed=p), rtol=0, atol=0)
    with pytest.raises(ValueError, match="solver 'ipndm', got 'dpmpp'"):
        kd.sample_dpmpp_2m(gmm, noise * 80.0, k_sig, disable=True, amed=p)


# ---- geosample sample --amed ------------------------------------------------------------------------

def test_cli_sample_amed(tmp_path):
    from geosample.cli import main
    out = tmp_path / "out"
    code = main(["sample", "--limit", "200", "--batch", "8", "--num-warmup", "16", "--gamma", "1.15", "--no-refine",
                 "--amed", "--amed-epochs", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["schedule"]: r for r in report["rows"]}
    assert set(rows) == {"gits", "polynomial", "amed"}
    assert rows["amed"]["nfe"] == 6 and report["amed"]["base"] == "gits"
    pred = gs.amed.load(out / "amed.pt")
    assert pred.solver == "ipndm" and pred.meta["training"]["num_samples"] == 16
    again = tmp_path / "again"
    assert main(["sample", "--limit", "200", "--batch", "8", "--num-warmup", "16", "--gamma", "1.15", "--no-refine",
                 "--amed", str(out / "amed.pt"), "--out", str(again)]) == 0
    rows2 = {r["schedule"]: r for r in json.loads((again / "report.json").read_text())["rows"]}
    assert rows2["amed"]["rmse"] == pytest.approx(rows["amed"]["rmse"], rel=1e-12)


# ---- the fused sampler ----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["amed", "dpm2", "ipndm", "dpmpp"])
def test_fused_sampler_runs_fixed_predictions(gmm, noise, solver):
    from geosample.solvers.fused_sampler import sample_fused
    sig = gs.schedules.polynomial(4, 0.01, 80.0)
    fixed = gs.amed.Fixed(R, C, A)
    torch.testing.assert_close(sample_fused(gmm, noise, sig, solver, amed=fixed, afs=True),
                               gs.sample(gmm, noise, sig, solver=solver, amed=fixed, afs=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="fixed AMED predictions"):
        sample_fused(gmm, noise, sig, solver, amed=object())
