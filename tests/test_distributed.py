"""geosample.distributed: 2 gloo ranks on CPU (tests/distributed_worker.py under torch.distributed.run)
against one process and the float64 KDE reference, plus the single-process fallbacks."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import geosample as gs
from geosample import distributed as gd

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The measured errors of one 2-rank run (one launch for every check keeps this ~10 s)."""
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "distributed_worker.py"), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if run.returncode:
        pytest.fail(f"torch.distributed.run failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("shards", ["empty", "uneven"])
@pytest.mark.parametrize("sigma", ["80", "1", "0.05", "per_sample"])
def test_sharded_kde_equals_one_process(two_ranks, shards, sigma):
    key = f"kde_{shards}_{sigma}"
    assert two_ranks[f"{key}_vs_one"] < TOL
    assert two_ranks[f"{key}_vs_ref64"] < TOL
    assert two_ranks[f"{key}_finite"] and two_ranks[f"{key}_identical"]


@pytest.mark.parametrize("sigma", ["80", "1", "0.05", "per_sample"])
def test_sharded_index_equals_one_process(two_ranks, sigma):
    """index=...: every shard certifies against the whole dataset's nearest row."""
    key = f"kde_uneven_indexed_{sigma}"
    assert two_ranks[f"{key}_vs_one"] < TOL and two_ranks[f"{key}_vs_ref64"] < TOL
    assert two_ranks[f"{key}_finite"] and two_ranks[f"{key}_identical"]


@pytest.mark.parametrize("sigma", ["80", "1", "0.05", "per_sample"])
def test_sharded_lazy_index_with_an_empty_shard(two_ranks, sigma):
    """index=dict(build_below=0.5): built on every shard at the first call with sigma <= 0.5 (the
    empty rank joins the index's collective from then on)."""
    key = f"kde_empty_lazy_indexed_{sigma}"
    assert two_ranks[f"{key}_vs_one"] < TOL and two_ranks[f"{key}_vs_ref64"] < TOL
    assert two_ranks[f"{key}_finite"] and two_ranks[f"{key}_identical"]


@pytest.mark.parametrize("tag", ["indexed", "indexed_empty"])
@pytest.mark.parametrize("sigma", ["80.0", "0.3", "0.01", "0.0001"])
def test_sharded_index_prunes_whole_shards(two_ranks, tag, sigma):
    exact = float(sigma) <= 0.01                      # certified sets (else sets over the cap take the full pass)
    assert two_ranks[f"kde_{tag}_{sigma}_vs_ref64"] < (1e-12 if exact else TOL)
    assert two_ranks[f"kde_{tag}_{sigma}_identical"]


def test_sharded_index_leaves_shards_without_work(two_ranks):
    """At sigma 1e-4 each query's rows sit on one shard: the other's certified sets are empty."""
    assert two_ranks["kde_empty_sets_rank0"] == 3


@pytest.mark.parametrize("sigma", ["1", "1e+08"])
def test_sharded_kde_far_queries(two_ranks, sigma):
    """Queries 1e16 away: the shards merge relative to the global mean (log_mass cancelled: each
    shard's weight was off by up to ~1e16 |x| u / sigma^2)."""
    assert two_ranks[f"kde_far_{sigma}_vs_mp"] < (1e-12 if sigma == "1" else TOL)


@pytest.mark.parametrize("shards", ["empty", "uneven"])
def test_sharded_call_on_split_batch(two_ranks, shards):
    assert two_ranks[f"kde_{shards}_sharded_call_vs_one"] < TOL


@pytest.mark.parametrize("batch", [5, 1])
@pytest.mark.parametrize("solver", ["ipndm", "heun"])
def test_data_parallel_sample_equals_one_process(two_ranks, batch, solver):
    assert two_ranks[f"sample_kde_b{batch}_{solver}"] < TOL
    assert two_ranks[f"sample_kde_b{batch}_{solver}_identical"]


def test_data_parallel_trajectory_with_replicated_denoiser(two_ranks):
    assert two_ranks["sample_mixture_traj_x"] < 1e-12
    assert two_ranks["sample_mixture_traj_denoised"] < 1e-12


@pytest.mark.parametrize("afs", [False, True])
def test_distributed_gits_search_same_schedule(two_ranks, afs):
    dist_indices, one_indices = two_ranks[f"gits_afs{afs}_indices"]
    assert dist_indices == one_indices
    assert two_ranks[f"gits_afs{afs}_cost_rel"] < TOL
    assert two_ranks[f"gits_afs{afs}_identical"]


def test_features_gathered_for_fid(two_ranks):
    assert two_ranks["features"] < 1e-12
    assert two_ranks["gather_rows"] == [0.0, 1.0, 2.0]


def test_check_inputs_catches_different_x(two_ranks):
    assert two_ranks["mismatch_raises"]


# single process: no process group, W = 1

def test_split_is_contiguous_and_covers():
    for n in range(0, 12):
        for w in range(1, 5):
            bounds = gd.split(n, w)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_one_rank_matches_kde_reference_float64():
    data = torch.rand(40, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sharded = gd.ShardedKDEDenoiser(gd.shard(data), backend="reference")
    ref = gs.KDEDenoiser(data, backend="reference")
    for s in (80.0, 1.0, 0.05):
        assert torch.allclose(sharded(x * s, s), ref(x * s, s), rtol=1e-12, atol=1e-12)
    noise = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = gs.schedules.polynomial(4)
    assert torch.equal(gd.sample(sharded, noise, sig), gs.sample(sharded, noise, sig))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="empty"):
        gd.ShardedKDEDenoiser(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="local_data"):
        gd.ShardedKDEDenoiser([[0.0, 1.0]])
    d = gd.ShardedKDEDenoiser(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        d(torch.zeros(1, 4), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        d(torch.zeros(1, 3), -1.0)
    with pytest.raises(ValueError, match="use_cache"):
        gd.gits_search(d, (3,), 2, use_cache=True)


def test_cli_sample_under_torchrun_matches_one_process(tmp_path):
    """`geosample sample` under torchrun: dataset sharded, teacher split, rank 0 writes the same report."""
    args = ["sample", "--batch", "6", "--nfe", "4", "--num-warmup", "16", "--no-cache", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "geosample.cli", *args, "--out", str(one)], env=env, check=True,
                   capture_output=True, timeout=120)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), "-m", "geosample.cli", *args,
                          "--out", str(two)], env=env, capture_output=True, text=True, timeout=180)
    if run.returncode:
        pytest.fail(f"torchrun geosample sample failed ({run.returncode}):\n{run.stderr[-4000:]}")
    assert run.stdout.count("geosample sample:") == 1  # only rank 0 reports
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["sigmas"] == rb["sigmas"]
        assert abs(ra["rmse"] - rb["rmse"]) < 1e-5 * max(ra["rmse"], 1e-3)
    assert (two / "samples.png").exists() and (two / "schedule.json").exists()
