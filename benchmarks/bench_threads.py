"""One torch thread or torch's default for the library's own loops: GITS search and sampling.

Three workloads, each timed at 1 thread and at torch's default (interleaved, in one process, the
automatic rule of :mod:`geosample._threads` switched off so that both settings really run):

    digits    the closed form over the bundled 8x8 digits (1797 x 64)      64 values a sample
    cifar10   the closed form over CIFAR-10 (50,000 x 3 x 32 x 32)        3072 values a sample
    network   the shipped cifar10-tiny UNet (3 x 16 x 16)                   768 values a sample

For each: ``gs.sample`` (64 samples, iPNDM, NFE 6) and a recommended GITS search (iPNDM, 5 steps;
cifar10: 16 warm-up samples on a 20-step grid, the full search is hours at 1 thread).  The ratio
t(default) / t(1 thread) says which setting the rule should pick (``SMALL_CALL`` values per call).

    python benchmarks/bench_threads.py             # writes results/threads_cpu.{json,md}
    pytest benchmarks/bench_threads.py             # the digits workload, as a test
"""
from __future__ import annotations

import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import pytest
import torch

import geosample as gs
from geosample import _threads
from geosample._io import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def workloads(which=("digits", "cifar10", "network")) -> dict:
    """name -> (denoiser, shape, search options)."""
    out = {}
    if "digits" in which:
        out["digits"] = (gs.KDEDenoiser(gs.data.load_dataset("digits")), (1, 8, 8), {})
    if "cifar10" in which:
        data = gs.data.load_dataset("cifar10", progress=False)
        out["cifar10"] = (gs.KDEDenoiser(data), tuple(data.shape[1:]), dict(num_warmup=16, batch_size=16,
                                                                             teacher_steps=20))
    if "network" in which:
        net = gs.models.load("cifar10-tiny")
        out["network"] = (net, net.shape, {})
    return out


def run_sample(denoiser, shape):
    noise = torch.randn((64, *shape), generator=torch.Generator().manual_seed(0))
    return gs.sample(denoiser, noise, gs.schedules.polynomial(6), solver="ipndm")


def run_search(denoiser, shape, options):
    return gs.gits.search(denoiser, shape, 5, solver="ipndm", gamma=gs.gits.GAMMAS, refine=True, use_cache=False,
                          **options)


def timed(fn, threads: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def measure(reps: int = 3) -> dict:
    default = torch.get_num_threads()
    _threads.SMALL_CALL = 0       # measure both settings (the rule would force one thread)
    rows = []
    for name, (denoiser, shape, options) in workloads().items():
        for task, fn in (("sample", lambda: run_sample(denoiser, shape)),
                         ("search", lambda: run_search(denoiser, shape, options))):
            fn()  # warm-up: caches, allocator, numba
            times = {1: [], default: []}
            for _ in range(reps):       # interleaved, so load changes hit both settings alike
                for t in times:
                    times[t].append(timed(fn, t))
            best = {t: min(v) for t, v in times.items()}
            rows.append({"workload": name, "task": task, "values_per_call": 64 * int(torch.Size(shape).numel()),
                         "one_thread_s": best[1], "default_s": best[default], "ratio": best[default] / best[1]})
    return {"date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "default_threads": default, "torch": torch.__version__, "load_average": os.getloadavg(), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# torch threads in the library's loops ({result['date']})", "",
             f"{result['machine']}, {result['cpus']} CPUs, torch {result['torch']}, default threads "
             f"{result['default_threads']}, load average at the start {result['load_average'][0]:.2f}. Best of 3, "
             "interleaved in one process; ratio = t(default threads) / t(1 thread), above 1: one thread is faster.", "",
             "| workload | task | values per call (64 samples) | 1 thread s | default s | ratio |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workload']} | {r['task']} | {r['values_per_call']:,} | {r['one_thread_s']:.2f} | "
                     f"{r['default_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def test_thread_settings_on_digits(benchmark):
    """The digits search at 1 thread (the rule's pick for 4,096 values a call); the caller's setting survives."""
    denoiser, shape, _ = workloads(("digits",))["digits"]
    before = torch.get_num_threads()
    benchmark.pedantic(run_search, args=(denoiser, shape, dict(num_warmup=8, teacher_steps=10)), rounds=1,
                       iterations=1)
    assert torch.get_num_threads() == before


if __name__ == "__main__":
    result = measure()
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "threads_cpu.json", json.dumps(result, indent=1))
    atomic_write_text(RESULTS / "threads_cpu.md", markdown(result))
    print(markdown(result))
