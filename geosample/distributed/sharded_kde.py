"""The closed-form (KDE) denoiser of a dataset sharded across ranks, merged exactly by log-sum-exp."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..denoisers.kde import INDEX_AUTO_MIN_D, INDEX_AUTO_N, KDEDenoiser, check_query
from .collectives import _all_gather, _all_reduce, _reduce_scatter, shard
from .group import rank, world_size

__all__ = ["ShardedKDEDenoiser", "closed_form_denoiser"]


def closed_form_denoiser(data, group=None, **kde_options):
    """The dataset's closed-form denoiser for this process: a :class:`ShardedKDEDenoiser` over
    this rank's shard when running distributed, else a plain :class:`KDEDenoiser` over all of it."""
    if world_size(group) > 1:
        return ShardedKDEDenoiser(shard(data, group), group=group, **kde_options)
    return KDEDenoiser(data, **kde_options)



class ShardedKDEDenoiser:
    """Exact KDE denoiser of the union of every rank's shard (:class:`geosample.KDEDenoiser`).

    Rank r holds rows I_r of the data (any size, empty included) and computes, with the local
    KDE backend on its shard, for logits l_i = -|x - y_i|^2 / (2 sigma^2) (``KDEStats.log_mass``,
    free of the per-query constant |x|^2 / (2 sigma^2), which would cost precision at small sigma):

        logZ_r = logsumexp_{i in I_r} l_i  [B],    D_r = sum_{i in I_r} e^{l_i - logZ_r} y_i  [B, D]

    (logZ_r = -inf, D_r = 0 for an empty shard).  The logits carry no per-shard constant, so the
    partial sums merge exactly by log-sum-exp: with M = max_r logZ_r and w_r = e^{logZ_r - M},

        D = sum_r w_r D_r / sum_r w_r.

    For queries farther than 3 R from the global mean c (R = max_i |y_i - c|) the logits are taken
    relative to c instead, -(|x - y_i|^2 - |x - c|^2) / (2 sigma^2) (``KDEStats.log_zc`` moved from
    the shard's mean to c): the same merge, without the cancellation of |x - y_i|^2 ~ |x|^2 that
    made shards of queries 1e8 or more away weigh each other wrongly.

    Collectives per call: an all_gather of logZ_r ([W, B] float64; every rank then forms M and
    the denominator itself) and one SUM of w_r D_r ([B, D] float64).  That is the same two
    latencies as all_reduce(MAX) + all_reduce(SUM) over [B, D + 1], without the extra column;
    an all_gather of the D_r would move W times more data.

    Two ways to call it, both collective (every rank of ``group`` must make the same calls):

    * ``D(x, sigma)``: x [B, ...] and sigma identical on every rank (``check_inputs=True``
      verifies it with one small all_gather per call); the SUM is an all_reduce.
    * ``D.sharded_call(x, sigma)``: x [m, ...] is this rank's rows of a batch split across
      ranks (the same m on every rank); the queries are all-gathered, each rank scores all W m
      of them against its shard, and the SUM is a reduce_scatter back to each rank's rows.
      :func:`sample` uses this.

    local_data: this rank's shard [n_r, ...] (trailing shape equal on every rank);
    kde_options: :class:`geosample.KDEDenoiser` options (backend, precision, chunk_size, ...).

    With ``index`` (see :class:`geosample.KDEDenoiser`), each rank indexes its shard and certifies
    its rows against the nearest row of the whole dataset (one extra all_reduce(MIN) of [B] per
    call, :class:`~geosample.denoisers.kde_index.KDEIndex`'s ``reduce_min``) with the tolerance
    spread over all N rows: the rows every shard leaves out carry less than ``tol`` of the total
    weight, as in one process, and a shard none of whose rows can matter does no exact work
    (logZ_r = -inf).
    """

    def __init__(self, local_data, group=None, check_inputs: bool = False, **kde_options):
        if not isinstance(local_data, torch.Tensor) or local_data.dim() < 2:
            got = tuple(local_data.shape) if isinstance(local_data, torch.Tensor) else type(local_data).__name__
            raise TypeError(f"local_data must be a torch.Tensor [n, ...], got {got}")
        self.group, self.check_inputs = group, check_inputs
        self.shape = tuple(local_data.shape[1:])
        shapes = [None] * world_size(group)
        if world_size(group) > 1:
            dist.all_gather_object(shapes, self.shape, group=group)
            if len(set(shapes)) > 1:
                raise ValueError(f"shards must share the trailing shape on every rank, got {shapes}")
        self.n = int(_all_reduce(torch.tensor([local_data.shape[0]], device=local_data.device), group))
        if self.n == 0:
            raise ValueError("every shard is empty: the dataset needs at least one row")
        index = kde_options.pop("index", "auto")
        self.local = KDEDenoiser(local_data, index=False, **kde_options) if local_data.shape[0] else None
        # the global mean c, radius R (max_i |y_i - c|) and sigma_data: far queries merge on logZ relative to c
        dev, dim = local_data.device, int(torch.tensor(self.shape).prod())
        c_r = self.local.store.center.to(dev) if self.local else torch.zeros(dim, dtype=torch.float64, device=dev)
        self.center = _all_reduce(c_r * local_data.shape[0], group) / self.n
        st = self.local.store if self.local else None
        r = (c_r - self.center).norm() + st.radius if st else torch.zeros((), dtype=torch.float64, device=dev)
        self.radius = float(_all_reduce(r.reshape(1).to(dev, torch.float64), group, "max"))
        ss = 2 * st.hy2.sum().to(dev) + st.n * (c_r - self.center).square().sum() if st else r.new_zeros(())
        sigma_data = math.sqrt(float(_all_reduce(ss.reshape(1).to(dev, torch.float64), group)) / (self.n * dim))
        # the index: on every shard or none, built at the same call (its collective runs on every rank)
        exact = kde_options.get("precision", "exact") == "exact" and kde_options.get("backend", "auto") != "reference"
        if index == "auto":
            index = {"build_below": 2 * sigma_data} if self.n >= INDEX_AUTO_N and dim > INDEX_AUTO_MIN_D else False
        self.indexed = index not in (False, None) and exact
        self.index_below = None
        if self.indexed:
            index = {**({} if index is True else dict(index)), "n_total": self.n,
                     "reduce_min": lambda t: _all_reduce(t, group, "min")}
            self.index_below = index.get("build_below", math.inf)
        if self.local is not None:
            self.local.configure_index(index if self.indexed else False)

    def __len__(self) -> int:
        return self.n

    def _check(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """sigma as float64 [B]; the same checks as KDEDenoiser, on ranks with empty shards too."""
        return check_query(x, sigma, self.shape)[1]

    def _partial(self, x64: torch.Tensor, sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logZ_r [B], D_r [B, ...]) of this shard, float64.  logZ_r is log_mass (logits
        -|x - y_i|^2 / (2 sigma^2)) for queries within 3 R of the global mean c, else relative to c:
        logsumexp_i -(|x - y_i|^2 - |x - c|^2) / (2 sigma^2), whose terms keep their gaps when
        |x - y_i|^2 is too large for float64 to resolve them (the choice is the same on every rank)."""
        xf = x64.flatten(1)
        far = (xf - self.center).norm(dim=1) > 3 * self.radius
        if self.indexed and float(sig.min()) <= self.index_below:
            self.index_below = math.inf                                # built now on every shard
        if self.local is None:
            if self.indexed and self.index_below == math.inf:          # the index's collective, on every rank
                _all_reduce(x64.new_full((x64.shape[0],), torch.inf), self.group, "min")
            return x64.new_full((x64.shape[0],), -torch.inf), torch.zeros_like(x64)
        out, stats = self.local(x64, sig, return_stats=True)
        c_r = self.local.store.center.to(xf.device)                    # log_zc is relative to the shard's mean
        shift = ((c_r - self.center) * (xf - 0.5 * (c_r + self.center))).sum(1) * sig.double() ** -2
        return torch.where(far, stats.log_zc + shift, stats.log_mass), out

    def _weights(self, log_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_r [B] of this rank, sum_r w_r [B]) from an all_gather of logZ_r."""
        every = _all_gather(log_z, self.group)                         # [W, B]
        w = torch.exp(every - every.amax(0))                           # empty shards: e^-inf = 0
        return w[rank(self.group)], w.sum(0)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sig = self._check(x, sigma)
        x64 = x.double()
        if self.check_inputs:
            probe = torch.stack([x64.sum(), (x64 * x64).sum(), sig.sum()])
            if not bool((_all_gather(probe, self.group) == probe).all()):
                raise ValueError("x and sigma must be identical on every rank (use sharded_call for split batches)")
        log_z, part = self._partial(x64, sig)
        w, den = self._weights(log_z)
        ones = [1] * len(self.shape)
        num = _all_reduce(part.mul_(w.view(-1, *ones)), self.group)
        return num.div_(den.view(-1, *ones)).to(x.dtype)

    def sharded_call(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D of this rank's rows x [m, ...] of a batch split across ranks (same m on every rank)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        sig = torch.as_tensor(sigma, dtype=torch.float64).to(x.device).reshape(-1).expand(x.shape[0])
        xs = _all_gather(x.double(), self.group).flatten(0, 1)        # [W m, ...]: all queries
        sigs = _all_gather(sig.contiguous(), self.group).flatten()
        self._check(xs, sigs)
        log_z, part = self._partial(xs, sigs)
        w, den = self._weights(log_z)
        ones = [1] * len(self.shape)
        num = _reduce_scatter(part.mul_(w.view(-1, *ones)), self.group)
        mine = den.view(world_size(self.group), -1)[rank(self.group)]
        return num.div_(mine.view(-1, *ones)).to(x.dtype)
