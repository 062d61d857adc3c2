"""Run by tests/test_distributed.py under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

Every check compares the distributed result with one process's result (computed on rank 0 from
the whole dataset) and, for the KDE, with the float64 reference backend.  Rank 0 writes the
measured errors as JSON to ``argv[1]``; the test file holds the thresholds.
"""
import json
import sys

import torch
import torch.distributed as dist

import geosample as gs
from geosample import distributed as gd

SHAPE = (1, 4, 4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of |a - b| / |b| (float64)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())


def same_on_all_ranks(t: torch.Tensor) -> bool:
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t.contiguous())
    return all(bool(torch.equal(e, t)) for e in every)


def dataset(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand((n, *SHAPE), generator=g) * 2 - 1).round(decimals=1)   # with near-duplicates


def kde_checks(data, cut, tag, out, **options):
    """Replicated calls at sigma in {80, 1, 0.05} and a per-sample sigma, and sharded_call."""
    local = data[:cut] if dist.get_rank() == 0 else data[cut:]
    sharded = gd.ShardedKDEDenoiser(local, chunk_size=64, check_inputs=True, **options)
    one, ref = gs.KDEDenoiser(data, chunk_size=64), gs.KDEDenoiser(data, backend="reference")
    x = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(2))
    sigmas = {"80": 80.0, "1": 1.0, "0.05": 0.05, "per_sample": torch.tensor([80, 5, 1, 0.3, 0.05, 0.01])}
    for name, s in sigmas.items():
        xs = x * (s if isinstance(s, float) else s.view(-1, 1, 1, 1)) + data[:6]
        d = sharded(xs, s)
        out[f"kde_{tag}_{name}_vs_one"] = rel(d, one(xs, s))
        out[f"kde_{tag}_{name}_vs_ref64"] = rel(d, ref(xs.double(), s))
        out[f"kde_{tag}_{name}_finite"] = bool(torch.isfinite(d).all())
        out[f"kde_{tag}_{name}_identical"] = same_on_all_ranks(d)
    rows = x[:3] * 1.0 + data[:3] if dist.get_rank() == 0 else x[3:] * 1.0 + data[3:6]
    d = gd.gather_rows(sharded.sharded_call(rows, 1.0))
    out[f"kde_{tag}_sharded_call_vs_one"] = rel(d, one(x * 1.0 + data[:6], 1.0))
    return sharded, one


def far_checks(data, out):
    """Queries 1e16 from the data (one-hot at sigma 1, a mixture at sigma 1e8) against mpmath:
    the shards' normalisers are compared relative to the global mean, not through |x - y|^2."""
    from reference_kde import softmax_mp
    local = data[:190] if dist.get_rank() == 0 else data[190:]
    sharded = gd.ShardedKDEDenoiser(local)
    g = torch.Generator().manual_seed(8)
    x = data[:3].double() + 1e16 * torch.nn.functional.normalize(torch.randn(3, 16, generator=g, dtype=torch.float64),
                                                                 dim=1).view(3, *SHAPE)
    for s in (1.0, 1e8):
        out[f"kde_far_{s:g}_vs_mp"] = rel(sharded(x, s), softmax_mp(data, x, s).view(3, *SHAPE))


def index_checks(out):
    """Per-shard pruning: clustered rows split so that at small sigma one shard holds every row
    that matters (the other's certified sets are empty), against one process and float64."""
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(8, 16, generator=g, dtype=torch.float64)
    data = (centres[torch.arange(400) % 8] + 0.05 * torch.randn(400, 16, generator=g, dtype=torch.float64)).float()
    local = data[dist.get_rank()::2]                     # rank 0: centres 0, 2, 4, 6; rank 1: 1, 3, 5, 7
    ref = gs.KDEDenoiser(data, backend="reference")
    for tag, opts in (("indexed", dict(cache=False, rank=8)), ("indexed_empty", dict(cache=False, rank=8))):
        part = local if tag == "indexed" else (data if dist.get_rank() == 1 else data[:0])
        sharded = gd.ShardedKDEDenoiser(part, index=opts)
        for s in (80.0, 0.3, 0.01, 1e-4):
            x = data[:6].double() + s * torch.randn(6, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            d = sharded(x, s)
            out[f"kde_{tag}_{s}_vs_ref64"] = rel(d, ref(x, s))
            out[f"kde_{tag}_{s}_identical"] = same_on_all_ranks(d)
        if tag == "indexed" and sharded.local is not None:
            _, st = sharded.local(x, 1e-4, return_stats=True)   # each query's rows sit on one shard only
            out[f"kde_empty_sets_rank{dist.get_rank()}"] = int(torch.isinf(st.log_mass).sum())


def sample_checks(sharded, one, out):
    """Data-parallel sampling, uneven (5 rows) and with an empty slice (1 row), two solvers."""
    sig = gs.schedules.polynomial(6)
    for b in (5, 1):
        noise = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        for solver in ("ipndm", "heun"):
            x = gd.sample(sharded, noise, sig, solver=solver)
            out[f"sample_kde_b{b}_{solver}"] = rel(x, gs.sample(one, noise, sig, solver=solver))
            out[f"sample_kde_b{b}_{solver}_identical"] = same_on_all_ranks(x)
    mix = gs.GaussianMixtureDenoiser(torch.zeros(2, *SHAPE).index_fill_(0, torch.tensor([1]), 0.5), torch.tensor([0.2, 0.3]))
    noise = torch.randn((7, *SHAPE), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    traj = gd.sample(mix, noise, sig, solver="dpmpp", return_trajectory=True)
    ref = gs.sample(mix, noise, sig, solver="dpmpp", return_trajectory=True)
    out["sample_mixture_traj_x"] = rel(traj.x.flatten(0, 1), ref.x.flatten(0, 1))
    out["sample_mixture_traj_denoised"] = rel(traj.denoised.flatten(0, 1), ref.denoised.flatten(0, 1))


def gits_checks(sharded, one, out):
    """Distributed GITS search (uneven rounds: 13 samples in rounds of 5) vs one process."""
    for afs in (False, True):
        kw = dict(teacher_steps=20, num_warmup=13, batch_size=5, afs=afs)
        dist_sched = gd.gits_search(sharded, SHAPE, 4, **kw)
        one_sched = gs.gits.search(one, SHAPE, 4, use_cache=False, **kw)
        out[f"gits_afs{afs}_indices"] = [dist_sched.indices, one_sched.indices]
        out[f"gits_afs{afs}_cost_rel"] = float((dist_sched.cost_matrix - one_sched.cost_matrix).nan_to_num(0, 0, 0).abs().max()
                                               / one_sched.cost_matrix.nan_to_num(0, 0, 0).abs().max())
        out[f"gits_afs{afs}_identical"] = same_on_all_ranks(torch.tensor(dist_sched.indices))


def misc_checks(out):
    """Features for FID, gather_rows with uneven and empty parts, and the identical-input check."""
    images = torch.rand((5, 3, 16, 16), generator=torch.Generator().manual_seed(5)) * 2 - 1
    extractor = gs.metrics.PixelFeatures()
    f = gd.extract_features(extractor, images, batch_size=2)
    out["features"] = rel(f, gs.metrics.extract_features(extractor, images))
    part = torch.arange(3.0).view(3, 1) if dist.get_rank() == 0 else torch.empty(0, 1)
    out["gather_rows"] = gd.gather_rows(part).flatten().tolist()
    sharded = gd.ShardedKDEDenoiser(dataset(10)[dist.get_rank()::2], check_inputs=True)
    try:
        sharded(torch.full((1, *SHAPE), float(dist.get_rank())), 1.0)
        out["mismatch_raises"] = False
    except ValueError:
        out["mismatch_raises"] = True


def main(path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    out = {"world_size": dist.get_world_size()}
    data = dataset(301)
    kde_checks(data, 0, "empty", out)                           # rank 0 holds nothing
    sharded, one = kde_checks(data, 190, "uneven", out)         # 190 + 111 rows
    kde_checks(data, 190, "uneven_indexed", out, index=dict(cache=False, rank=4))
    kde_checks(data, 0, "empty_lazy_indexed", out, index=dict(cache=False, rank=4, build_below=0.5))
    index_checks(out)
    far_checks(data, out)
    sample_checks(sharded, one, out)
    gits_checks(sharded, one, out)
    misc_checks(out)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
