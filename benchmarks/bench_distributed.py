"""geosample.distributed on CPU: 1 vs 2 gloo ranks, and the share of time in collectives.

``pytest benchmarks/bench_distributed.py`` (CI: tiny, quick with ``--benchmark-disable``): the
one-rank overhead of :class:`ShardedKDEDenoiser` over :class:`KDEDenoiser` (float64 merge).
``python benchmarks/bench_distributed.py`` launches itself under ``torch.distributed.run`` as
1 rank x 2 threads, 1 rank x 1 thread and 2 ranks x 1 thread (the machine has 2 cores) and
writes benchmarks/results/distributed_cpu.json and .md.  Collective time is split into *wait*
(a barrier before each collective: the other rank is still computing) and *transfer* (the
collective itself).  Sizes: N = 8192 (CIFAR-sized rows D = 3072; ``GEOSAMPLE_BENCH_FULL=1``:
N = 32768), batch 64, iPNDM with 6 steps.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import geosample as gs
from geosample import distributed as gd
from geosample._io import atomic_write_text

FULL = os.environ.get("GEOSAMPLE_BENCH_FULL") == "1"
N, DIM, BATCH, STEPS = (32768 if FULL else 8192), 3072, 64, 6
RESULTS = Path(__file__).resolve().parent / "results"


def _data(n: int, dim: int) -> torch.Tensor:
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _queries(y: torch.Tensor, b: int, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return y[torch.randint(0, y.shape[0], (b,), generator=g)] + sigma * torch.randn(b, y.shape[1], generator=g)


@pytest.mark.parametrize("kind", ["kde", "sharded_one_rank"])
def test_one_rank_overhead(benchmark, kind):
    y = _data(2048, 192)
    d = gs.KDEDenoiser(y) if kind == "kde" else gd.ShardedKDEDenoiser(y)
    x = _queries(y, 16, 1.0)
    out = benchmark(d, x, 1.0)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


class CollectiveClock:
    """Wraps geosample.distributed's collectives, in every module that calls them: seconds waiting
    (barrier) and transferring."""
    NAMES = ("_all_gather", "_all_reduce", "_reduce_scatter")
    MODULES = (gd.collectives, gd.sharded_kde, gd.gits_hook)

    def __init__(self):
        self.wait = self.transfer = 0.0
        self.calls = 0
        for name in self.NAMES:
            timed = self._timed(getattr(gd.collectives, name))
            for module in self.MODULES:
                if hasattr(module, name):
                    setattr(module, name, timed)

    def _timed(self, fn):
        def run(t, group):
            if gd.world_size(group) == 1:
                return fn(t, group)
            t0 = time.perf_counter()
            dist.barrier(group)
            t1 = time.perf_counter()
            out = fn(t, group)
            self.wait, self.transfer, self.calls = self.wait + t1 - t0, self.transfer + time.perf_counter() - t1, self.calls + 1
            return out
        return run

    def reset(self):
        self.wait = self.transfer = 0.0
        self.calls = 0


def _timed(clock: CollectiveClock, fn, reps: int) -> dict:
    """Median wall time of ``reps`` runs of fn (after one warm-up) and its collective share."""
    fn()
    times, waits, transfers = [], [], []
    for _ in range(reps):
        clock.reset()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        waits.append(clock.wait)
        transfers.append(clock.transfer)
    k = sorted(range(reps), key=times.__getitem__)[reps // 2]
    return {"s": times[k], "wait_s": waits[k], "transfer_s": transfers[k], "collectives": clock.calls}


def worker(path: str) -> None:
    """One rank of the scaling run (under torch.distributed.run)."""
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    clock = CollectiveClock()
    y = _data(N, DIM)
    sharded = gd.ShardedKDEDenoiser(gd.shard(y))
    noise = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(2))
    sig = gs.schedules.polynomial(STEPS)
    rows = {}
    for sigma in (80.0, 1.0):
        x = _queries(y, BATCH, sigma)
        rows[f"sharded_call_sigma{sigma:g}"] = _timed(clock, lambda: sharded(x, sigma), 3)
    rows["sample_sharded_data"] = _timed(clock, lambda: gd.sample(sharded, noise, sig), 1)
    replicated = gs.KDEDenoiser(y)
    rows["sample_replicated_data"] = _timed(clock, lambda: gd.sample(replicated, noise, sig), 1)
    if dist.get_rank() == 0:
        atomic_write_text(path, json.dumps({"world_size": world, "threads": torch.get_num_threads(), "rows": rows}))
    dist.destroy_process_group()


def _launch(ranks: int, threads: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                        "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker", str(out)],
                       check=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return json.loads(out.read_text())


def _markdown(result: dict) -> str:
    runs = result["runs"]
    wide, one, two = runs["1x2"]["rows"], runs["1x1"]["rows"], runs["2x1"]["rows"]
    lines = [f"# geosample.distributed on CPU, 1 vs 2 gloo ranks ({result['date']})", "",
             f"{result['machine']}. N = {N}, D = {DIM}, batch {BATCH}, iPNDM {STEPS} steps. "
             "All runs share the same 2 cores: 2 ranks x 1 thread vs 1 rank x 1 thread is the scaling "
             "(ideal 2x), vs 1 rank x 2 threads the overhead of splitting (ideal 1x). "
             f"Load average before the runs: {result['load_average']} (other jobs on the machine). "
             "Collectives (2 ranks): count per case; wait = barrier before each collective (load "
             "imbalance), transfer = the collective itself, as % of the 2-rank time.", "",
             "| case | 1 rank x 2 thr (s) | 1 rank x 1 thr (s) | 2 ranks x 1 thr (s) | vs 1x1 | vs 1x2 | collectives | wait % | transfer % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r2 in two.items():
        a, b = wide[name]["s"], one[name]["s"]
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {r2['s']:.3f} | {b / r2['s']:.2f}x | {a / r2['s']:.2f}x | "
                     f"{r2['collectives']} | {100 * r2['wait_s'] / r2['s']:.1f} | {100 * r2['transfer_s'] / r2['s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"Python {platform.python_version()}",
              "sizes": {"n": N, "dim": DIM, "batch": BATCH, "steps": STEPS},
              "load_average": [round(v, 2) for v in os.getloadavg()],
              "runs": {f"{r}x{t}": _launch(r, t) for r, t in ((1, 2), (1, 1), (2, 1))}}
    for name, text in (("distributed_cpu.json", json.dumps(result, indent=1)), ("distributed_cpu.md", _markdown(result))):
        atomic_write_text(RESULTS / name, text)
    print(_markdown(result))


if __name__ == "__main__":
    worker(sys.argv[2]) if sys.argv[1:2] == ["--worker"] else main()
