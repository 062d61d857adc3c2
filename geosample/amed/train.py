"""``gs.amed.train``: fit a predictor so that the student's steps land on a teacher's trajectory.

As in the reference (``training/loss.py``, ``training_loop.py``): a teacher solves seeded noise on a
fine grid that contains the base grid; for every interval i the student (:class:`.run.PredictedRun`,
the sampler itself) steps from x_i to x_{i+1} and the loss is the squared L2 distance to the
teacher's x_{i+1}, averaged over the batch, with one Adam step per interval.  One-step variants
("amed", "euler", "dpm2") start every interval at the teacher's x_i (their first call there is
computed once and reused every epoch); multistep ones ("ipndm", "dpmpp") run on from their own
output with their own history, cut from autograd between intervals.  The loss reaches the
predictions through the plan's coefficients and through the extra call D(x_m, a t_m): by autograd
when the denoiser supports it (a torch network), else (a closed-form KDE, Triton kernels, C++) by
a forward difference along the call's tangent in r (and a), one more call each.

``loss="trajectory"`` (not in the reference) runs the student over the whole grid from x_T for
every variant, sums the intervals' distances to the teacher and takes one Adam step per batch with
gradients through the whole run (so the predictions of early intervals see their effect on later
ones, which a multistep solver's history carries); it needs a denoiser autograd can go through.

Differences from the reference, measured in docs/amed.md: a fixed training set of
``num_samples`` teacher trajectories visited for ``epochs`` epochs (the reference draws fresh noise
for 10k trajectories), and the teacher defaults to iPNDM on a 60-step fine grid (GITS's teacher)
instead of 1-2 Heun or iPNDM steps per interval, because geosample measures the error to the
converged solve.  ``teacher=`` takes trajectories already solved on any fine grid that contains the
base grid, e.g. the GITS search's warm-up, so one teacher run serves both.

Trained predictors are cached in ``$GEOSAMPLE_CACHE/amed`` (default ``~/.cache/geosample/amed``),
keyed by every setting, the denoiser's fingerprint and the versions; an unreadable or invalid entry
is trained again with a :class:`~geosample.gits.cache.CacheWarning`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings

import torch
from tqdm.auto import tqdm

from .._io import cache_root, remove_stale_temps
from .._version import __version__
from ..gits.cache import CacheWarning
from ..gits.config import _check_int
from ..gits.search import _check_shape, fingerprint
from ..schedules import check_sigmas
from ..solvers import get_solver, sample
from ..solvers.amed import check_options, check_variant
from ..solvers.base import CountedDenoiser
from ..solvers.sampling import state_dtype
from .features import FeatureSource, resolve
from .predictor import FORMAT, Predictor, from_blob, load
from .run import PredictedRun

__all__ = ["train", "teacher_grid", "ONE_STEP"]

#: Variants whose intervals start at the teacher's point while training (no history across intervals).
ONE_STEP = ("amed", "euler", "dpm2")
LOSSES = ("auto", "interval", "trajectory")
FD_STEP = 1e-3  # forward-difference step in r and a for denoisers autograd cannot go through
TEACHER_RHO = 7.0  # each base interval of the default teacher is cut uniformly in sigma^(1/7)


def teacher_grid(sigmas, steps: int) -> torch.Tensor:
    """The default teacher's fine grid: every interval of ``sigmas`` cut into ceil(steps / K) pieces
    uniform in sigma^(1/7), so a polynomial rho=7 grid of K | steps steps gives the polynomial grid
    of ``steps`` steps (GITS's fine grid for steps = 60)."""
    s = [float(v) for v in sigmas]
    per = max(1, math.ceil(steps / (len(s) - 1)))
    out = []
    for a, b in zip(s, s[1:]):
        ua, ub = a ** (1 / TEACHER_RHO), b ** (1 / TEACHER_RHO)
        out += [(ua + k / per * (ub - ua)) ** TEACHER_RHO for k in range(per)]
    return torch.tensor(out + [s[-1]], dtype=torch.float64)


def _teacher_points(denoiser, grid, shape, num_samples, batch_size, seed, solver, steps, device, progress):
    """[K+1, N, *shape]: the teacher's states at the base grid's points, from seeded noise."""
    fine = teacher_grid(grid, steps)
    per = (fine.numel() - 1) // (len(grid) - 1)
    keep = set(range(0, fine.numel() - 1, per))
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for start in tqdm(range(0, num_samples, batch_size), disable=not progress, desc="amed teacher", leave=False):
        noise = torch.randn((min(batch_size, num_samples - start), *shape), generator=gen).to(device)
        points = []
        out = sample(denoiser, noise, fine, solver=solver,
                     callback=lambda info: points.append(info["x"]) if info["i"] in keep else None)
        rounds.append(torch.stack(points + [out]))
    return torch.cat(rounds, dim=1)


def _given_teacher(teacher, grid) -> torch.Tensor:
    """[K+1, N, ...] from a trajectory (``gs.Trajectory``) on a fine grid containing ``grid``."""
    x, fine = getattr(teacher, "x", None), getattr(teacher, "sigmas", None)
    if not isinstance(x, torch.Tensor) or not isinstance(fine, torch.Tensor) or x.shape[0] != fine.numel():
        raise TypeError("teacher must be a gs.Trajectory (x [T+1, N, ...] on sigmas [T+1]), e.g. "
                        "gs.sample(..., return_trajectory=True) on a fine grid")
    fine = fine.detach().double().cpu()
    idx = []
    for s in grid:
        hit = torch.nonzero((fine - s).abs() <= 1e-9 * s).flatten()
        if hit.numel() == 0:
            raise ValueError(f"the teacher's grid does not contain the base grid's sigma {s:.6g}; it must contain "
                             "every base sigma (e.g. a GITS schedule on the teacher's fine grid)")
        idx.append(int(hit[0]))
    return x[idx]


def _key(params: dict) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_path(key: str):
    return cache_root() / "amed" / f"predictor-{key}.pt"


def _cached(key: str) -> Predictor | None:
    path = _cache_path(key)
    if not path.exists():
        return None
    try:
        pred = load(path)
        if pred.meta.get("cache_key") != key:
            raise ValueError("another key")
        return pred
    except (ValueError, OSError) as e:
        warnings.warn(f"AMED cache entry {path} is invalid ({e}); training again", CacheWarning, stacklevel=3)
        return None


def _first_calls(model, X, grid, afs, source, batch_size):
    """D(x_i, t_i) and the features there for every teacher point (interval 0 with AFS: none)."""
    K, N = len(grid) - 1, X.shape[1]
    den, feats = [None] * K, [None] * K
    for i in range(int(bool(afs)), K):
        ds, fs = [], []
        for b in range(0, N, batch_size):
            d = model(X[i, b:b + batch_size], grid[i])
            ds.append(d)
            fs.append(source(d))
        den[i] = torch.cat(ds)
        feats[i] = None if fs[0] is None else torch.cat(fs)
    return den, feats


def _differentiable(model, x: torch.Tensor, sigma: float) -> bool:
    """Whether autograd goes through the denoiser to its input (probed on one sample)."""
    probe = x[:1].detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            return bool(model(probe, sigma).requires_grad)
    except RuntimeError:
        return False


def train(denoiser, shape, sigmas, *, solver: str, afs: bool = False, features: str = "auto", teacher=None,
          teacher_solver: str = "ipndm", teacher_steps: int = 60, num_samples: int = 256, batch_size: int = 64,
          epochs: int = 8, lr: float = 5e-3, scale_dir: float = 0.01, scale_time: float = 0.0, hidden: int = 64,
          init=None, loss: str = "auto", seed: int = 0, device="cpu", use_cache: bool = True,
          progress: bool = False, **options) -> Predictor:
    """Train an AMED predictor for ``solver`` ("amed" or a plugin base: "euler", "dpm2", "ipndm",
    "dpmpp", with its ``options``) on the positive base grid ``sigmas`` for ``denoiser`` on samples
    of ``shape``.

    features: "auto" (the bottleneck when the denoiser exposes one, else "denoised"), "bottleneck",
    "denoised" or "none" (:mod:`.features`).  teacher: None (``teacher_solver`` on
    :func:`teacher_grid` with ``teacher_steps``, ``num_samples`` noises from ``seed``) or a
    trajectory on a fine grid containing ``sigmas`` (its samples are the training set).
    epochs over the training set in batches of ``batch_size`` (shuffled from ``seed``), Adam with
    ``lr``; scale_dir / scale_time: the allowed relative ranges of the factors (0 fixes them at 1).
    loss: "interval" (the reference's: one Adam step per interval, multistep runs cut between
    intervals), "trajectory" (the whole run, see the module docstring) or "auto" (trajectory when
    autograd goes through the denoiser, else interval).
    init: :class:`~geosample.amed.Fixed` predictions to start from (default r = 1/2, factors 1),
    e.g. the midpoints of a GITS schedule of 2K steps on the base grid of its even points.
    Deterministic for a given seed, device and thread count.  Returns the predictor (eval mode),
    with ``meta["training"]`` (settings, seconds, loss per epoch and interval) and ``meta["mean"]``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    shape = _check_shape(shape)
    variant = check_variant(solver)
    options = check_options(variant, options)
    grid_t = check_sigmas(sigmas)
    grid = grid_t.tolist()
    if grid[-1] == 0.0:
        raise ValueError("the base grid must be positive: the final denoise to 0 needs no prediction "
                         "(train on sigmas[:-1], then sample with the 0 appended)")
    K = len(grid) - 1
    for name, v, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1), ("epochs", epochs, 1),
                         ("seed", seed, 0), ("teacher_steps", teacher_steps, 1), ("hidden", hidden, 1)):
        _check_int(name, v, low)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    kind = resolve(features, denoiser)
    checked = Predictor(K, 0, hidden=hidden, scale_dir=scale_dir, scale_time=scale_time)  # before any work
    if init is not None:
        checked.start_from(init)
    t_start = time.perf_counter()
    fp = fingerprint(denoiser, shape, device)
    X = None
    if teacher is None:
        teacher_record = {"solver": get_solver(teacher_solver).name, "steps": teacher_steps,
                          "num_samples": num_samples, "seed": seed, "grid": "teacher_grid rho 7"}
    else:
        X = _given_teacher(teacher, grid).to(device, state_dtype(getattr(teacher.x, "dtype", torch.float32)))
        digest = hashlib.sha256(X.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:32]
        teacher_record = {"given": digest, "num_samples": X.shape[1]}
    record = {"format": FORMAT, "geosample": __version__, "torch": str(torch.__version__).split("+")[0],
              "fingerprint": fp, "sigmas": grid, "solver": variant, "options": options, "afs": bool(afs),
              "shape": list(shape), "features": kind, "teacher": teacher_record, "batch_size": batch_size, "epochs": epochs, "lr": lr,
              "scale_dir": scale_dir, "scale_time": scale_time, "hidden": hidden, "seed": seed,
              "init": None if init is None else init.to_dict(), "loss": loss}
    key = _key(record)
    if use_cache and (hit := _cached(key)) is not None:
        return hit.to(device)
    model = CountedDenoiser(denoiser)
    if X is None:
        X = _teacher_points(denoiser, grid, shape, num_samples, batch_size, seed, teacher_solver, teacher_steps,
                            device, progress)
    X = X.detach()
    N = X.shape[1]
    source = FeatureSource(kind, denoiser).open()
    try:
        with torch.no_grad():
            den, feats = _first_calls(model, X, grid, afs, source, batch_size)
        gradient = "autograd" if _differentiable(model, X[-1], grid[-1]) else "difference"
        used = loss if loss != "auto" else "trajectory" if gradient == "autograd" else "interval"
        if used == "trajectory" and gradient != "autograd":
            raise ValueError("loss='trajectory' differentiates through every call of the run: it needs a denoiser "
                             "autograd can go through (a torch network); use loss='interval'")
        seen = [f for f in feats if f is not None]
        in_features = seen[0].shape[1] if seen else 0
        gen = torch.Generator().manual_seed(seed)
        pred = Predictor(K, in_features, hidden=hidden, scale_dir=scale_dir, scale_time=scale_time, generator=gen)
        if init is not None:
            pred.start_from(init)
        if in_features:
            allf = torch.cat(seen)
            pred.feature_mean.copy_(allf.mean(0))
            pred.feature_std.copy_(allf.std(0).clamp_min(1e-6))
        pred = pred.to(device).train()
        opt = torch.optim.Adam(pred.parameters(), lr=lr)
        calls = _Calls(model, gradient, scale_time > 0)
        losses = []
        bar = tqdm(total=epochs * math.ceil(N / batch_size), disable=not progress, desc=f"amed train [{variant}]",
                   leave=False)
        for _ in range(epochs):
            perm = torch.randperm(N, generator=gen)
            sums = torch.zeros(K, dtype=torch.float64)
            for b in range(0, N, batch_size):
                idx = perm[b:b + batch_size].to(X.device)
                step = _whole_run if used == "trajectory" else _one_step if variant in ONE_STEP else _multistep
                batch_losses = step(pred, opt, calls, variant, grid, afs, options, X, den, feats, source, idx)
                sums += torch.tensor(batch_losses, dtype=torch.float64) * idx.numel()
                bar.update(1)
                bar.set_postfix(loss=f"{sum(batch_losses) / K:.4g}")
            losses.append((sums / N).tolist())
        bar.close()
    finally:
        source.close()
    pred.eval().requires_grad_(False)
    meta = {**record, "cache_key": key, "versions": {"geosample": __version__, "torch": str(torch.__version__)},
            "mean": _mean_predictions(pred, feats, K, N),
            "training": {"seconds": time.perf_counter() - t_start, "loss": losses, "denoiser_calls": model.calls,
                         "num_samples": N, "gradient": gradient, "objective": used}}
    pred.meta = meta
    pred = from_blob(pred.to_blob()).to(device)  # exactly what a save and load give
    if use_cache:
        path = _cache_path(key)
        remove_stale_temps(path.parent)
        pred.save(path)
    return pred


def _loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per sample, averaged over the batch (the reference's loss)."""
    return (x - target).flatten(1).pow(2).sum(1).mean()


def _interval(grid, i: int) -> str:
    return f"interval {i} (sigma {grid[i]:.4g} -> {grid[i + 1]:.4g})"


def _optimize(opt, loss, where: str) -> float:
    """One Adam step on ``loss``; a non-finite loss or gradient (NaN from the denoiser, predictions
    leaving the float range) is a FloatingPointError naming ``where``, never a step or a cached result."""
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"AMED training: the loss at {where} is not finite; check the denoiser there")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise FloatingPointError(f"AMED training: the gradient at {where} is not finite; check the denoiser there")
    opt.step()
    return float(loss.detach())


class _Calls:
    """A training step's denoiser calls: an interval's first call (at a detached state, no gradient)
    and the extra call D(x_m, a t_m), differentiable in the predictions: by autograd, or as
    D + (r - r.detach()) dD/dr (+ the same in a) with forward differences along
    :meth:`~.run.PredictedRun.tangents`."""

    def __init__(self, model, gradient: str, with_a: bool):
        self.model, self.gradient, self.with_a = model, gradient, with_a

    def first(self, run, grad: bool = False) -> None:
        point, sigma = run.request()
        with torch.set_grad_enabled(grad):
            d = self.model(point, sigma)
        run.send(d)

    def extra(self, run) -> None:
        point, sigma = run.request()
        if self.gradient == "autograd" or not run.r.requires_grad:
            run.send(self.model(point, sigma))
            return
        x_dot, s_r, s_a = run.tangents()
        with torch.no_grad():
            p, s = point.detach(), sigma.detach()
            d = self.model(p, s)
            parts = [(run.r, (self.model(p + FD_STEP * x_dot.to(p.dtype), s + FD_STEP * s_r) - d) / FD_STEP)]
            if self.with_a:
                parts.append((run.a, (self.model(p, s + FD_STEP * s_a) - d) / FD_STEP))
        for v, slope in parts:
            d = d + (v - v.detach()).to(d.dtype).reshape(-1, *([1] * (d.dim() - 1))) * slope
        run.send(d)


def _one_step(pred, opt, calls, variant, grid, afs, options, X, den, feats, source, idx):
    out = []
    for i in range(len(grid) - 1):
        run = PredictedRun(variant, grid, afs, options, X[i, idx], pred, source, start=i)
        if den[i] is not None:
            run.send(den[i][idx], features=None if feats[i] is None else feats[i][idx])
        calls.extra(run)
        out.append(_optimize(opt, _loss(run.x, X[i + 1, idx]), _interval(grid, i)))
    return out


def _multistep(pred, opt, calls, variant, grid, afs, options, X, den, feats, source, idx):
    run = PredictedRun(variant, grid, afs, options, X[0, idx], pred, source)
    out = []
    for i in range(len(grid) - 1):
        if not run.in_interval:  # the interval's first call (with AFS, interval 0 has none)
            calls.first(run)
        calls.extra(run)
        out.append(_optimize(opt, _loss(run.x, X[i + 1, idx]), _interval(grid, i)))
        run.detach()
    return out


def _whole_run(pred, opt, calls, variant, grid, afs, options, X, den, feats, source, idx):
    """loss="trajectory": the run from x_T over every interval, one step on the summed losses."""
    run = PredictedRun(variant, grid, afs, options, X[0, idx], pred, source)
    losses = []
    for i in range(len(grid) - 1):
        if not run.in_interval:
            calls.first(run, grad=True)
        calls.extra(run)
        losses.append(_loss(run.x, X[i + 1, idx]))
    bad = next((i for i, v in enumerate(losses) if not bool(torch.isfinite(v))), None)
    _optimize(opt, sum(losses), "the whole run" if bad is None else _interval(grid, bad))
    return [float(v.detach()) for v in losses]


@torch.no_grad()
def _mean_predictions(pred, feats, K, N) -> dict:
    """Per interval, the predictions averaged over the features at the teacher's points."""
    r, c, a = [], [], []
    for i in range(K):
        ri, ci, ai = pred(feats[i], i, N)
        r.append(float(ri.mean()))
        c.append(float(ci.mean()))
        a.append(float(ai.mean()))
    return {"r": r, "scale_dir": c, "scale_time": a}
