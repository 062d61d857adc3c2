"""AMED-Solver and AMED-Plugin: update rules against the reference's loops (float64), NFE, trajectories,
learned predictors (same plan, gradients, determinism), save/load/cache validation."""
import dataclasses
import math
import warnings

import pytest
import torch

import geosample as gs
from geosample.amed.run import PredictedRun
from geosample.gits.cache import CacheWarning

from reference_solvers import AMED_REFERENCE, nfe_schedule

R = [0.3, 0.6, 0.45, 0.7, 0.52]
C = [1.01, 0.99, 1.0, 1.02, 0.98]
A = [1.1, 0.9, 1.0, 1.05, 0.95]
OPTIONS = {"amed": [{}], "euler": [{}], "dpm2": [{}], "ipndm": [{}, {"max_order": 2}, {"max_order": 3}],
           "dpmpp": [{}, {"max_order": 2}, {"max_order": 1}, {"lower_order_final": False}]}
CASES = [(s, o) for s, opts in OPTIONS.items() for o in opts]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("solver, options", CASES)
@pytest.mark.parametrize("afs", [False, True])
def test_matches_reference_loops(gmm, noise, solver, options, afs):
    sig = gs.schedules.polynomial(5, 0.01, 80.0)
    got = gs.sample(gmm, noise, sig, solver=solver, amed=gs.amed.Fixed(R, C, A), afs=afs, **options)
    want = AMED_REFERENCE[solver](lambda x, s: gmm(x, s), noise * 80.0, sig.tolist(), R, C, A, afs=afs, **options)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("solver", sorted(AMED_REFERENCE))
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("to_zero", [False, True])
def test_nfe_accounting(gmm, noise, solver, steps, afs, to_zero):
    sig = nfe_schedule(steps, to_zero)
    calls = []
    fixed = gs.amed.Fixed([0.4] * steps)
    traj = gs.sample(lambda x, s: calls.append(s) or gmm(x, s), noise, sig, solver=solver, amed=fixed, afs=afs,
                     return_trajectory=True)
    n = gs.nfe(solver, sig.numel() - 1, afs=afs, denoise_to_zero=to_zero, amed=fixed)
    assert len(calls) == traj.nfe == n == 2 * steps - int(afs) + int(to_zero)
    assert gs.nfe("amed", steps, afs=afs) == 2 * steps - int(afs)
    assert gs.solvers.steps_for_nfe(solver, 2 * steps - int(afs), afs=afs, amed=True) == steps


def test_steps_for_nfe_refuses_impossible_counts():
    with pytest.raises(ValueError, match="valid NFEs: 2, 4"):
        gs.solvers.steps_for_nfe("amed", 5)
    assert gs.solvers.steps_for_nfe("amed", 5, afs=True) == 3


@pytest.mark.parametrize("solver", sorted(AMED_REFERENCE))
def test_trajectory_and_callback(gmm, noise, solver):
    sig = gs.schedules.polynomial(4, 0.002, 80.0)
    seen = []
    traj = gs.sample(gmm, noise, sig, solver=solver, amed=gs.amed.Fixed(R[:4], C[:4], A[:4]), return_trajectory=True,
                     callback=lambda info: seen.append((info["i"], info["sigma"], info["sigma_next"])))
    assert traj.x.shape == (5, *noise.shape) and traj.denoised.shape == (4, *noise.shape)
    assert traj.solver == ("amed" if solver == "amed" else f"{solver}+amed")
    torch.testing.assert_close(traj.x[0], noise * 80.0, rtol=0, atol=0)
    torch.testing.assert_close(traj.x[-1], gs.sample(gmm, noise, sig, solver=solver,
                                                     amed=gs.amed.Fixed(R[:4], C[:4], A[:4])), rtol=0, atol=0)
    for i in range(4):  # the recorded evaluation is D(x_i, t_i), on the grid
        torch.testing.assert_close(traj.denoised[i], gmm(traj.x[i], sig[i].item()), rtol=1e-12, atol=1e-12)
    s = sig.tolist()
    assert seen == [(i, s[i], s[i + 1]) for i in range(4)]


def test_trailing_zero_is_final_denoise(gmm, noise):
    sig = torch.cat([gs.schedules.polynomial(3, 0.05, 80.0), torch.zeros(1, dtype=torch.float64)])
    traj = gs.sample(gmm, noise, sig, solver="ipndm", amed=gs.amed.Fixed([0.4, 0.5, 0.6]), return_trajectory=True)
    torch.testing.assert_close(traj.x[-1], gmm(traj.x[-2], 0.05), rtol=1e-12, atol=1e-12)
    assert traj.nfe == 7


def test_plugin_special_cases(gmm, noise):
    """dpm2 with r = 1/2 and unit factors is DPM-Solver-2; AMED-Solver with r = 1/2 is the same midpoint rule."""
    sig = gs.schedules.logsnr(4, 0.01, 80.0)
    half = gs.amed.Fixed([0.5] * 4)
    plain = gs.sample(gmm, noise, sig, solver="dpm2")
    for solver in ("dpm2", "amed"):
        torch.testing.assert_close(gs.sample(gmm, noise, sig, solver=solver, amed=half), plain, rtol=1e-12, atol=1e-12)


def test_bad_input(gmm, noise):
    sig = gs.schedules.polynomial(3)
    with pytest.raises(ValueError, match="needs predictions"):
        gs.sample(gmm, noise, sig, solver="amed")
    with pytest.raises(ValueError, match="3 values for a grid of 2"):
        gs.sample(gmm, noise, gs.schedules.polynomial(2), solver="amed", amed=gs.amed.Fixed([0.5] * 3))
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        gs.amed.Fixed([0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="finite and > 0"):
        gs.amed.Fixed([0.5] * 3, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="scale_time has 2 values"):
        gs.amed.Fixed([0.5] * 3, None, [1.0, 1.0])
    with pytest.raises(TypeError, match="r is AMED's prediction"):
        gs.sample(gmm, noise, sig, solver="dpm2", amed=gs.amed.Fixed([0.5] * 3), r=0.3)
    with pytest.raises(ValueError, match="AMED runs on the solvers"):
        gs.sample(gmm, noise, sig, solver="heun", amed=gs.amed.Fixed([0.5] * 3))
    with pytest.raises(TypeError, match="amed must be"):
        gs.sample(gmm, noise, sig, solver="ipndm", amed=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="finite sigma_max"):
        gs.sample(gmm, noise, torch.tensor([math.inf, 10.0, 1.0], dtype=torch.float64), solver="amed",
                  amed=gs.amed.Fixed([0.5, 0.5]))


def test_fixed_dict_round_trip():
    f = gs.amed.Fixed(R, C)
    assert gs.amed.Fixed.from_dict(f.to_dict()) == f and f.steps == 5
    with pytest.raises(ValueError, match="unknown keys"):
        gs.amed.Fixed.from_dict({"r": R, "scale": C})


# ---- learned predictors ------------------------------------------------------------------------

def constant_predictor(K, r, c, a):
    """An untrained predictor (no features) started from per-interval constants: it gives exactly them."""
    return gs.amed.Predictor(K, 0, scale_dir=0.5, scale_time=0.5).double().start_from(gs.amed.Fixed(r, c, a))


@pytest.mark.parametrize("solver, options", CASES)
@pytest.mark.parametrize("afs", [False, True])
def test_learned_run_is_the_fixed_plan(gmm, noise, solver, options, afs):
    """Per-sample predictions that happen to be constant give the fixed predictions' result."""
    K = 4
    sig = gs.schedules.polynomial(K, 0.01, 80.0).tolist()
    p = constant_predictor(K, R[:K], C[:K], A[:K])
    want = gs.sample(gmm, noise, sig, solver=solver, amed=gs.amed.Fixed(R[:K], C[:K], A[:K]), afs=afs, **options)
    run = PredictedRun(solver, sig, afs, gs.solvers.amed.check_options(solver, options), noise * 80.0,
                       lambda f, i, b: p(f, i, b), lambda d: None)
    while (req := run.request()) is not None:
        sigma = req[1] if isinstance(req[1], torch.Tensor) else torch.full((noise.shape[0],), req[1],
                                                                           dtype=torch.float64)
        run.send(gmm(req[0], sigma))
    torch.testing.assert_close(run.x, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["amed", "ipndm", "dpmpp"])
def test_training_gradient_matches_finite_differences(gmm, noise, solver):
    """The run's gradient in r (plan coefficients by central differences, t_m and the extra call by
    autograd) is the derivative of the loss at x_{i+1} computed from fixed-prediction runs."""
    K, i = 3, 1
    sig = gs.schedules.polynomial(K, 0.01, 80.0).tolist()
    r0, target = [0.45, 0.55, 0.4], gs.sample(gmm, noise, gs.schedules.polynomial(60, 0.01, 80.0), solver="ipndm")

    def loss_fixed(r_i):
        r = list(r0)
        r[i] = r_i
        traj = gs.sample(gmm, noise, sig, solver=solver, amed=gs.amed.Fixed(r), return_trajectory=True)
        return float((traj.x[i + 1] - target).pow(2).sum())

    r_t = torch.tensor(r0[i], dtype=torch.float64, requires_grad=True)

    def predict(f, j, b):
        r = r_t.expand(b) if j == i else torch.full((b,), r0[j], dtype=torch.float64)
        return r, torch.ones(b, dtype=torch.float64), torch.ones(b, dtype=torch.float64)

    run = PredictedRun(solver, sig, False, gs.solvers.amed.check_options(solver, {}), noise * 80.0, predict,
                       lambda d: None)
    while run.done_intervals <= i:
        x, s = run.request()
        s = s if isinstance(s, torch.Tensor) else torch.full((noise.shape[0],), s, dtype=torch.float64)
        run.send(gmm(x, s))
    (run.x - target).pow(2).sum().backward()
    h = 1e-5
    fd = (loss_fixed(r0[i] + h) - loss_fixed(r0[i] - h)) / (2 * h)
    assert r_t.grad.item() == pytest.approx(fd, rel=1e-5)


def test_train_sample_save_load(gmm, noise, tmp_path):
    sig = gs.schedules.polynomial(3, 0.002, 80.0)
    kw = dict(solver="ipndm", num_samples=32, batch_size=16, epochs=2, seed=3, teacher_steps=30)
    p = gs.amed.train(gmm, (6,), sig, **kw)
    assert p.features == "denoised" and p.meta["training"]["num_samples"] == 32
    assert len(p.meta["training"]["loss"]) == 2 and len(p.meta["mean"]["r"]) == 3
    again = gs.amed.train(gmm, (6,), sig, use_cache=False, **kw)   # deterministic
    for k, v in p.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    traj = gs.sample(gmm, noise, sig, solver="ipndm", amed=p, return_trajectory=True)
    assert traj.nfe == 6 and torch.isfinite(traj.x).all()
    path = tmp_path / "p.pt"
    p.save(path)
    q = gs.amed.load(path, denoiser=gmm)
    torch.testing.assert_close(gs.sample(gmm, noise, sig, solver="ipndm", amed=q), traj.x[-1], rtol=0, atol=0)
    fixed = p.fixed()
    assert isinstance(fixed, gs.amed.Fixed) and fixed.steps == 3


def test_predictor_refuses_other_uses(gmm, noise, tmp_path):
    sig = gs.schedules.polynomial(3, 0.002, 80.0)
    p = gs.amed.train(gmm, (6,), sig, solver="amed", afs=True, num_samples=16, batch_size=16, epochs=1,
                      teacher_steps=12)
    gs.sample(gmm, noise, sig, solver="amed", amed=p, afs=True)
    cases = [(dict(sigmas=gs.schedules.polynomial(3, 0.01, 80.0)), "base grid"),
             (dict(solver="dpm2"), "solver 'amed'"), (dict(afs=False), "afs=True"),
             (dict(denoiser=gs.GaussianMixtureDenoiser(torch.zeros(1, 6, dtype=torch.float64), [0.5])), "fingerprint"),
             (dict(noise=noise[:, :5]), "sample shape")]
    for change, message in cases:
        args = {"denoiser": gmm, "noise": noise, "sigmas": sig, "solver": "amed", "afs": True, **change}
        with pytest.raises(ValueError, match=message):
            gs.sample(args["denoiser"], args["noise"], args["sigmas"], solver=args["solver"], amed=p, afs=args["afs"])
    path = tmp_path / "p.pt"
    p.save(path)
    blob = torch.load(path, weights_only=True)
    for edit, message in [(lambda b: b["state_dict"]["heads.bias"].add_(1.0), "hash mismatch"),
                          (lambda b: b.update(format=0), "format 0"),
                          (lambda b: b.update(kind="x"), "not a geosample")]:
        b = torch.load(path, weights_only=True)
        edit(b)
        torch.save(b, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=message):
            gs.amed.load(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a geosample AMED predictor"):
        gs.amed.load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="fingerprint"):
        gs.amed.load(path, denoiser=gs.GaussianMixtureDenoiser(torch.zeros(1, 6, dtype=torch.float64), [0.5]))
    assert blob["meta"]["solver"] == "amed"


def test_cache_hit_and_invalid_entry(gmm, tmp_path):
    sig = gs.schedules.polynomial(2, 0.002, 80.0)
    kw = dict(solver="euler", num_samples=16, batch_size=16, epochs=1, teacher_steps=10)
    p = gs.amed.train(gmm, (6,), sig, **kw)
    files = list((tmp_path / "cache" / "amed").glob("predictor-*.pt"))
    assert len(files) == 1
    q = gs.amed.train(gmm, (6,), sig, **kw)   # the training record (its wall time) comes from the file
    assert q.meta["training"]["seconds"] == p.meta["training"]["seconds"]
    assert gs.amed.train(gmm, (6,), sig, **{**kw, "lr": 1e-3}).meta["cache_key"] != p.meta["cache_key"]
    files[0].write_bytes(b"damaged")
    with pytest.warns(CacheWarning, match="training again"):
        gs.amed.train(gmm, (6,), sig, **kw)


def test_teacher_given_as_trajectory(gmm):
    sig = gs.schedules.polynomial(3, 0.002, 80.0)
    fine = gs.schedules.polynomial(30, 0.002, 80.0)
    noise = torch.randn(16, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    traj = gs.sample(gmm, noise, fine, solver="ipndm", return_trajectory=True)
    p = gs.amed.train(gmm, (6,), sig, solver="ipndm", teacher=traj, batch_size=16, epochs=1)
    assert p.meta["teacher"]["num_samples"] == 16 and "given" in p.meta["teacher"]
    with pytest.raises(ValueError, match="does not contain the base grid"):
        gs.amed.train(gmm, (6,), gs.schedules.logsnr(3, 0.002, 80.0), solver="ipndm", teacher=traj)
    # the default teacher's grid for a polynomial base of K | steps steps is the polynomial grid of steps steps
    torch.testing.assert_close(gs.amed.teacher_grid(sig, 30), fine, rtol=1e-12, atol=0)


def test_bottleneck_features_of_the_shipped_network():
    net = gs.models.load("cifar10-tiny")
    assert gs.amed.find_bottleneck(net) is net.net.mid[-1]
    x = torch.randn(2, *net.shape, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = net.bottleneck.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = net(x, torch.full((2,), 1.0))
    hook.remove()
    assert seen == [torch.Size([2, 64, 4, 4])]
    torch.testing.assert_close(out, net(x, torch.full((2,), 1.0)), rtol=0, atol=0)  # hooking changes nothing
    sig = gs.schedules.polynomial(2)
    p = gs.amed.train(net, net.shape, sig, solver="dpmpp", num_samples=4, batch_size=4, epochs=1, teacher_steps=4)
    assert p.features == "bottleneck" and p.in_features == 16
    assert torch.isfinite(gs.sample(net, x, sig, solver="dpmpp", amed=p)).all()
    with pytest.raises(ValueError, match="needs a denoiser with a 'bottleneck'"):
        gs.amed.train(lambda x, s: x, (6,), sig, solver="amed", features="bottleneck")


@pytest.mark.parametrize("solver", ["amed", "dpmpp"])
def test_difference_gradient_for_black_box_denoisers(gmm, noise, solver):
    """Without autograd through D, the extra call's derivative by forward differences along the
    run's tangents gives (nearly) the autograd gradient in r and a."""
    from geosample.amed.train import _Calls
    from geosample.solvers.base import CountedDenoiser

    K = 3
    sig = gs.schedules.polynomial(K, 0.01, 80.0).tolist()
    target = gs.sample(gmm, noise, gs.schedules.polynomial(60, 0.01, 80.0), solver="ipndm")
    grads = {}
    for mode in ("autograd", "difference"):
        r_t = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
        a_t = torch.tensor(1.02, dtype=torch.float64, requires_grad=True)

        def predict(f, j, b):
            one = torch.ones(b, dtype=torch.float64)
            return (r_t.expand(b), one, a_t.expand(b)) if j == 1 else (0.5 * one, one, one)

        run = PredictedRun(solver, sig, False, gs.solvers.amed.check_options(solver, {}), noise * 80.0, predict,
                           lambda d: None)
        calls = _Calls(CountedDenoiser(gmm), mode, True)
        calls.first(run)
        calls.extra(run)       # interval 0
        calls.first(run)
        calls.extra(run)       # interval 1: the predictions with gradients
        (run.x - target).pow(2).sum().backward()
        grads[mode] = (r_t.grad.item(), a_t.grad.item())
    assert grads["difference"][0] == pytest.approx(grads["autograd"][0], rel=1e-2)
    assert grads["difference"][1] == pytest.approx(grads["autograd"][1], rel=1e-2)


def test_init_is_where_training_starts(gmm, noise):
    sig = gs.schedules.polynomial(3, 0.002, 80.0)
    init = gs.amed.Fixed([0.2, 0.7, 0.4], [1.005, 1.0, 0.995])
    p = gs.amed.Predictor(3, 5).start_from(init)     # untrained: exactly the init, whatever the features
    r, c, a = p(torch.randn(4, 5), 1, 4)
    assert torch.allclose(r, torch.full((4,), 0.7), atol=1e-6) and torch.allclose(c, torch.ones(4), atol=1e-6)
    with pytest.raises(ValueError, match="outside the allowed range"):
        gs.amed.Predictor(3, 0, scale_dir=0.001).start_from(init)
    with pytest.raises(ValueError, match="for 3 intervals"):
        gs.amed.Predictor(3, 0).start_from(gs.amed.Fixed([0.5] * 2))
    with pytest.raises(ValueError, match="outside the allowed range"):
        gs.amed.train(gmm, (6,), sig, solver="amed", init=init, scale_dir=0.001)
    q = gs.amed.train(gmm, (6,), sig, solver="amed", init=init, num_samples=8, batch_size=8, epochs=1, lr=1e-9,
                      teacher_steps=6)
    torch.testing.assert_close(torch.tensor(q.fixed().r), torch.tensor(init.r), atol=1e-5, rtol=0)


def test_trajectory_loss(gmm, noise):
    sig = gs.schedules.polynomial(3, 0.002, 80.0)
    kw = dict(solver="ipndm", num_samples=32, batch_size=16, epochs=3, lr=0.05, teacher_steps=30, features="none")
    p = gs.amed.train(gmm, (6,), sig, loss="trajectory", **kw)
    assert p.meta["loss"] == "trajectory" and len(p.meta["training"]["loss"][0]) == 3
    first, last = (sum(epoch) for epoch in (p.meta["training"]["loss"][0], p.meta["training"]["loss"][-1]))
    assert last < first
    black_box = lambda x, s: gmm(x.detach(), s)  # noqa: E731  (autograd cannot go through it)
    with pytest.raises(ValueError, match="needs a denoiser autograd can go through"):
        gs.amed.train(black_box, (6,), sig, loss="trajectory", **kw)
    with pytest.raises(ValueError, match="loss must be one of"):
        gs.amed.train(gmm, (6,), sig, loss="final", **kw)
    q = gs.amed.train(black_box, (6,), sig, **kw)   # "auto": the interval loss, forward differences
    assert q.meta["training"]["gradient"] == "difference" and q.meta["training"]["objective"] == "interval"
    assert p.meta["training"]["objective"] == "trajectory"


def test_nan_in_training_is_an_error_naming_the_interval(gmm, tmp_path):
    """A denoiser returning NaN near one interval's t_mid trained silently (gradients zeroed) and
    the predictor was cached; now a FloatingPointError names the interval, and nothing is cached."""
    sig = gs.schedules.polynomial(3, 0.01, 80.0)

    def bad(x, s):
        out = gmm(x, s)
        return out + torch.where((s < 5) & (s > 0.2), float("nan"), 0.0).view(-1, *[1] * (x.dim() - 1))

    with pytest.raises(FloatingPointError, match=r"interval \d \(sigma"):
        gs.amed.train(bad, (6,), sig, solver="ipndm", num_samples=8, batch_size=8, epochs=1, teacher_steps=6,
                      teacher=gs.sample(gmm, torch.randn(8, 6, generator=torch.Generator().manual_seed(0)),
                                        gs.amed.teacher_grid(sig, 6), solver="ipndm", return_trajectory=True))
    assert not list((tmp_path / "cache").rglob("*.pt"))


def test_bad_scales_are_refused_before_any_denoiser_call(gmm):
    calls = []
    with pytest.raises(ValueError, match="scale_dir"):
        gs.amed.train(lambda x, s: calls.append(s) or gmm(x, s), (6,), gs.schedules.polynomial(3, 0.01, 80.0),
                      solver="ipndm", scale_dir=2.0)
    assert calls == []
