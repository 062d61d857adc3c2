"""A learned AMED predictor: per sample and interval, (r, scale_dir, scale_time) from features.

Network (after the reference's ``AMED_predictor``, smaller): the pooled features (:mod:`.features`),
standardised by their training mean and spread, go through Linear-SiLU-Linear to a code of 8; the
interval index through an embedding of 8; from both, SiLU, then one linear head per output:

    z = z_0[i] + head(h),   r = 1e-3 + (1 - 2e-3) sigmoid(z_r),
    scale_dir = 1 + s_d (2 sigmoid(z_c) - 1),   scale_time = 1 + s_t (2 sigmoid(z_a) - 1)

(s_d, s_t: the allowed relative ranges; 0 fixes the factor at 1).  z_0 holds the starting
predictions per interval (:meth:`Predictor.start_from`; default r = 1/2, DPM-Solver-2's geometric
midpoint, and factors 1) and the heads start at zero, so an untrained predictor gives exactly them.

A predictor belongs to one denoiser, base grid, solver (with its options), AFS setting, sample
shape and feature kind; ``meta`` records them, :meth:`Predictor.check` refuses any other use, and
:func:`load` refuses files of another format, with a wrong content hash or a broken structure.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from .._io import atomic_write
from ..solvers.amed import Fixed, check_options, check_variant
from .features import FEATURES, FeatureSource
from .run import PredictedRun

__all__ = ["Predictor", "load", "FORMAT", "KIND"]

FORMAT = 1
KIND = "geosample.amed.Predictor"
R_LOW = 1e-3   # r stays in [R_LOW, 1 - R_LOW]: t_m strictly inside the interval
META_KEYS = ("sigmas", "solver", "options", "afs", "shape", "features", "fingerprint", "versions")


class Predictor(nn.Module):
    """Learned AMED predictions (see the module docstring); ``gs.sample(..., amed=predictor)``.

    intervals: K of the base grid; in_features: F of the pooled features (0 for ``features="none"``);
    meta: what it was trained for (:data:`META_KEYS`) and how (``"training"``, ``"mean"``).
    """

    def __init__(self, intervals: int, in_features: int, *, hidden: int = 64, code: int = 8,
                 scale_dir: float = 0.01, scale_time: float = 0.0, meta: dict | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, v in (("scale_dir", scale_dir), ("scale_time", scale_time)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v < 1):
                raise ValueError(f"{name} (the allowed relative range) must be in [0, 1), got {v!r}")
        self.config = {"intervals": int(intervals), "in_features": int(in_features), "hidden": int(hidden),
                       "code": int(code), "scale_dir": float(scale_dir), "scale_time": float(scale_time)}
        self.meta = dict(meta or {})
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.register_buffer("prior", torch.zeros(intervals, 3))
        self.encode = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, code)) \
            if in_features else None
        self.interval = nn.Embedding(intervals, code)
        self.heads = nn.Linear(2 * code if in_features else code, 3)
        with torch.no_grad():
            for layer in ([] if self.encode is None else [self.encode[0], self.encode[2]]):
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                layer.bias.zero_()
            nn.init.normal_(self.interval.weight, std=0.1, generator=generator)
            self.heads.weight.zero_()
            self.heads.bias.zero_()
        self._verified = weakref.WeakSet()

    # ---- predictions ----------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.config["in_features"]

    def forward(self, features: torch.Tensor | None, i: int, batch: int):
        """(r, scale_dir, scale_time), each [batch], for interval ``i``; features [batch, F] (None: zeros)."""
        w = self.heads.weight
        h = self.interval.weight[i].expand(batch, -1)
        if self.encode is not None:
            f = torch.zeros(batch, self.in_features, device=w.device) if features is None else features.to(w.device)
            f = (f.to(w.dtype) - self.feature_mean) / self.feature_std
            h = torch.cat([self.encode(f), h], dim=1)
        z = self.prior[i] + self.heads(F.silu(h))
        s_d, s_t = self.config["scale_dir"], self.config["scale_time"]
        r = R_LOW + (1 - 2 * R_LOW) * torch.sigmoid(z[:, 0])
        return r, 1 + s_d * (2 * torch.sigmoid(z[:, 1]) - 1), 1 + s_t * (2 * torch.sigmoid(z[:, 2]) - 1)

    def start_from(self, init: Fixed) -> "Predictor":
        """Make ``init`` (per-interval :class:`Fixed` predictions) the starting point: z_0 is set so
        that the untrained predictor gives exactly them.  Their factors must lie in the allowed ranges."""
        K = self.config["intervals"]
        if not isinstance(init, Fixed) or init.steps != K:
            raise ValueError(f"init must be gs.amed.Fixed predictions for {K} intervals, got {init!r}")
        r, c, a = init.predictions()
        z = torch.zeros(K, 3, dtype=torch.float64)
        for i in range(K):
            z[i, 0] = _logit((min(max(r[i], R_LOW), 1 - R_LOW) - R_LOW) / (1 - 2 * R_LOW))
            for j, (name, v, s) in enumerate((("scale_dir", c[i], self.config["scale_dir"]),
                                              ("scale_time", a[i], self.config["scale_time"])), start=1):
                if v == 1.0:
                    continue
                if not abs(v - 1) < s:
                    raise ValueError(f"init {name} {v} lies outside the allowed range 1 +- {s}")
                z[i, j] = _logit(((v - 1) / s + 1) / 2)
        with torch.no_grad():
            self.prior.copy_(z.to(self.prior.dtype))
        return self

    def fixed(self) -> Fixed:
        """The predictions averaged over the training samples, per interval, as :class:`Fixed`
        (exact for ``features="none"``): what a diffusers pipeline, which gives one timestep per
        batch, can run."""
        mean = self.meta.get("mean")
        if not mean:
            raise ValueError("this predictor has no recorded mean predictions (it was not trained by gs.amed.train)")
        return Fixed(mean["r"], mean["scale_dir"], mean["scale_time"])

    # ---- what it is for -------------------------------------------------------------------------
    @property
    def solver(self) -> str:
        return self.meta["solver"]

    @property
    def sigmas(self) -> torch.Tensor:
        """The base grid (float64, positive) it was trained on."""
        return torch.tensor(self.meta["sigmas"], dtype=torch.float64)

    @property
    def afs(self) -> bool:
        return bool(self.meta["afs"])

    @property
    def features(self) -> str:
        return self.meta["features"]

    def check(self, denoiser, shape, sigmas, solver: str, afs: bool, options: dict, device="cpu") -> None:
        """ValueError naming every difference between this use and what the predictor was trained
        for (denoiser fingerprint, base grid, solver and options, AFS, sample shape)."""
        from ..gits.search import fingerprint  # a sibling layer; imported where used

        problems = []
        grid = [float(s) for s in sigmas]
        if grid and grid[-1] == 0.0:
            grid = grid[:-1]
        want = self.meta["sigmas"]
        if len(grid) != len(want) or any(abs(a - b) > 1e-12 * abs(b) for a, b in zip(grid, want)):
            problems.append(f"base grid {_short(want)}, got {_short(grid)}")
        if solver != self.solver:
            problems.append(f"solver {self.solver!r}, got {solver!r}")
        elif check_options(solver, options) != self.meta["options"]:
            problems.append(f"options {self.meta['options']}, got {check_options(solver, options)}")
        if bool(afs) != self.afs:
            problems.append(f"afs={self.afs}, got afs={bool(afs)}")
        if list(shape) != list(self.meta["shape"]):
            problems.append(f"sample shape {tuple(self.meta['shape'])}, got {tuple(shape)}")
        if not problems and not self._known(denoiser):
            fp = fingerprint(denoiser, tuple(shape), device)
            if fp != self.meta["fingerprint"]:
                problems.append(f"the denoiser with fingerprint {self.meta['fingerprint']}, got one with {fp} "
                                "(another model, or changed weights)")
            else:
                self._remember(denoiser)
        if problems:
            raise ValueError("this AMED predictor does not fit this use; it was trained for " + "; ".join(problems))

    def _known(self, denoiser) -> bool:
        try:
            return denoiser in self._verified
        except TypeError:
            return False

    def _remember(self, denoiser) -> None:
        try:
            self._verified.add(denoiser)
        except TypeError:  # not weak-referenceable: checked on every use
            pass

    def start(self, solver: str, sigmas: list, afs: bool, options: dict, x: torch.Tensor, on_step=None,
              denoiser=None) -> PredictedRun:
        """The run ``gs.sample`` drives: checked (:meth:`check`), then predictions per sample."""
        self.check(denoiser, tuple(x.shape[1:]), sigmas, solver, afs, options, x.device)
        source = FeatureSource(self.features, denoiser).open()

        def predict(features, i, batch):
            with torch.no_grad():
                return self(features, i, batch)

        try:
            return PredictedRun(solver, sigmas, afs, check_options(solver, options), x, predict, source, on_step)
        except BaseException:
            source.close()
            raise

    # ---- files ----------------------------------------------------------------------------------
    def to_blob(self) -> dict:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        blob = {"kind": KIND, "format": FORMAT, "config": self.config, "meta": self.meta, "state_dict": state}
        blob["sha256"] = _digest(blob)
        return blob

    def save(self, path) -> None:
        """Write the predictor atomically (``torch.save`` of plain tensors and JSON-like values,
        with a sha256 of the content); :func:`load` reads it back."""
        blob = self.to_blob()
        atomic_write(path, lambda f: torch.save(blob, f))

    def extra_repr(self) -> str:
        return (f"solver={self.meta.get('solver')!r}, intervals={self.config['intervals']}, "
                f"features={self.meta.get('features')!r}, afs={self.meta.get('afs')}")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _short(v: list) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"


def _digest(blob: dict) -> str:
    h = hashlib.sha256(json.dumps({k: blob[k] for k in ("kind", "format", "config", "meta")}, sort_keys=True,
                                  default=str).encode())
    for k in sorted(blob["state_dict"]):
        t = blob["state_dict"][k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def from_blob(blob, where: str = "the predictor") -> Predictor:
    """A :class:`Predictor` from :meth:`Predictor.to_blob`'s dict; ValueError when it is not one of
    this format, its hash does not match, or its structure is broken."""
    if not isinstance(blob, dict) or blob.get("kind") != KIND:
        raise ValueError(f"{where} is not a geosample AMED predictor")
    if blob.get("format") != FORMAT:
        raise ValueError(f"{where} is an AMED predictor of format {blob.get('format')!r}; this geosample reads "
                         f"format {FORMAT} (train it again)")
    try:
        ok = blob["sha256"] == _digest(blob)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{where} is a broken AMED predictor ({type(e).__name__}: {e})") from None
    if not ok:
        raise ValueError(f"{where}: content hash mismatch (a modified or damaged file)")
    meta = blob["meta"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{where} lacks {missing} (what it was trained for)")
    check_variant(meta["solver"])
    if meta["features"] not in FEATURES:
        raise ValueError(f"{where} has unknown features {meta['features']!r}")
    try:
        cfg = blob["config"]
        pred = Predictor(cfg["intervals"], cfg["in_features"], hidden=cfg["hidden"], code=cfg["code"],
                         scale_dir=cfg["scale_dir"], scale_time=cfg["scale_time"], meta=meta)
        pred.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{where} has a broken structure ({type(e).__name__}: {e})") from None
    if len(meta["sigmas"]) != cfg["intervals"] + 1:
        raise ValueError(f"{where}: {cfg['intervals']} intervals but a grid of {len(meta['sigmas'])} sigmas")
    return pred.eval().requires_grad_(False)


def load(path, denoiser=None, device="cpu") -> Predictor:
    """A predictor saved by :meth:`Predictor.save`, checked (format, content hash, structure); with
    ``denoiser`` also its fingerprint now (else on first use)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load fails on junk with almost any exception type
        raise ValueError(f"{path} is not a geosample AMED predictor ({type(e).__name__})") from None
    pred = from_blob(blob, str(path)).to(device)
    if denoiser is not None:
        from ..gits.search import fingerprint
        fp = fingerprint(denoiser, tuple(pred.meta["shape"]), device)
        if fp != pred.meta["fingerprint"]:
            raise ValueError(f"{path} was trained for the denoiser with fingerprint {pred.meta['fingerprint']}; "
                             f"this one has {fp} (another model, or changed weights)")
        pred._remember(denoiser)
    return pred
