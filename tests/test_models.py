"""The shipped trained denoiser: loads offline with weights_only, the EDM preconditioning, denoises."""
import copy
import json

import pytest
import torch
from torch.nn import functional as F

import geosample as gs
from geosample import models


@pytest.fixture(scope="module")
def model():
    return models.load("cifar10-tiny")


def cifar_like(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour images in [-1, 1]: 4x4 random colour fields bilinearly upsampled to 16x16."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 1.6 - 0.8
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def test_load_returns_an_eval_module_with_the_contract_attributes(model):
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.shape == (3, 16, 16)
    assert model.sigma_min == pytest.approx(0.002) and model.sigma_max == pytest.approx(80.0)
    assert not any(p.requires_grad for p in model.parameters())
    assert "cifar10-tiny" in models.available()
    with pytest.raises(ValueError, match="unknown model"):
        models.load("cifar10-huge")


def test_weights_load_with_weights_only(monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    models.load("cifar10-tiny")
    assert calls == [True]


def test_shape_dtype_and_bad_input(model):
    x = cifar_like(3)
    out = model(x, 0.5)
    assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert model(x.double(), 0.5).dtype == torch.float64
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 32, 32), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        model(x, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(2))


def test_edm_preconditioning_matches_float64_formula(model):
    x = cifar_like(4, seed=1) + torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.01, 0.5, 2.0, 40.0])
    net64 = copy.deepcopy(model.net).double()
    s = sigma.double()[:, None, None, None]
    sd = model.sigma_data
    want = sd ** 2 / (s ** 2 + sd ** 2) * x.double() \
        + s * sd / (s ** 2 + sd ** 2).sqrt() * net64(x.double() / (s ** 2 + sd ** 2).sqrt(), sigma.double().log() / 4)
    torch.testing.assert_close(model(x, sigma).double(), want, rtol=1e-4, atol=1e-4)


def test_denoises_better_than_identity_at_sigma_one(model):
    clean = cifar_like(32, seed=3)
    noisy = clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(4))
    mse = float((model(noisy, 1.0) - clean).pow(2).mean())
    identity = float((noisy - clean).pow(2).mean())
    assert mse < 0.25 * identity, (mse, identity)


def test_deterministic_and_batch_independent(model):
    x = cifar_like(6, seed=5) + 0.3 * torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    a, b = model(x, 0.3), model(x, 0.3)
    assert torch.equal(a, b)
    torch.testing.assert_close(model(x[:2], 0.3), a[:2], rtol=1e-5, atol=1e-5)


def test_sampling_the_network_gives_images(model):
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    x = gs.sample(model, noise, gs.schedules.polynomial(6), solver="ipndm")
    assert x.shape == noise.shape and bool(torch.isfinite(x).all())
    assert float(x.abs().max()) < 2.0 and float(x.std()) > 0.1


def test_cli_sample_runs_the_main_job_on_the_model(tmp_path):
    from geosample.cli import main

    out = tmp_path / "out"
    assert main(["sample", "--model", "cifar10-tiny", "--schedule", "polynomial", "--nfe", "4", "--batch", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "cifar10-tiny" and report["rows"][0]["nfe"] == 4
    assert (out / "samples.png").exists()


@pytest.mark.parametrize("damage", ["flip", "nan", "truncate", "empty", "junk"])
def test_damaged_weights_are_refused(monkeypatch, tmp_path, damage):
    """One flipped byte loaded (output off by 1e-4), NaN weights loaded and returned NaN, junk gave a traceback."""
    from importlib import resources
    blob = bytearray(resources.files(models).joinpath("cifar10_tiny.pt").read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 1
    elif damage == "nan":
        weights = torch.load(resources.files(models).joinpath("cifar10_tiny.pt"), weights_only=True)
        weights["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in weights["state_dict"].items()}
        torch.save(weights, tmp_path / "nan.pt")
        blob = bytearray((tmp_path / "nan.pt").read_bytes())
    elif damage == "truncate":
        blob = blob[: len(blob) // 3]
    else:
        blob = bytearray(b"" if damage == "empty" else b"not a checkpoint\n" * 10)
    (tmp_path / "cifar10_tiny.pt").write_bytes(bytes(blob))
    monkeypatch.setattr(models.resources, "files", lambda package: tmp_path)
    with pytest.raises(ValueError, match="weights of 'cifar10-tiny' .* are damaged"):
        models.load("cifar10-tiny")


def test_dtype_names_and_bad_devices():
    assert models.load("cifar10-tiny", dtype="float64").net.stem.weight.dtype == torch.float64
    assert models.load("cifar10-tiny", dtype="torch.bfloat16").net.stem.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        models.load("cifar10-tiny", dtype="int8")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        models.load("cifar10-tiny", dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        models.load("cifar10-tiny", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available"):
            models.load("cifar10-tiny", device="cuda")


def test_integer_inputs_are_refused(model):
    """int64 x came back as int64 (truncated)."""
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.int64), 1.0)
