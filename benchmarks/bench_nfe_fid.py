"""Latency of the samplers of the FID study (benchmarks/nfe_fid.py) on the shipped network.

One benchmark per cell: ``gs.sample(cifar10-tiny, noise, sigmas, solver)`` on one batch of
``$GEOSAMPLE_NFE_FID_BATCH`` noises (default 64; 4 when benchmarks are disabled, as in CI), the
cells read from ``$GEOSAMPLE_NFE_FID_CELLS`` (a JSON list written by ``nfe_fid.py --stage
latency``) or, by default, iPNDM and UniPC at NFE 4 on EDM's schedule.  ``extra_info["cell"]``
names the cell for nfe_fid.py; per-image latency = time / batch.

Run: ``python benchmarks/nfe_fid.py --stage latency`` (CI: ``pytest benchmarks --benchmark-disable``).
"""
import json
import os

import pytest
import torch

import geosample as gs

DEFAULT = [{"method": s, "solver": s, "schedule": "polynomial", "nfe": 4,
            "sigmas": gs.schedules.polynomial(4).tolist()} for s in ("ipndm", "unipc")]


def cells():
    path = os.environ.get("GEOSAMPLE_NFE_FID_CELLS")
    return json.loads(open(path).read()) if path else DEFAULT


@pytest.fixture(scope="module")
def net():
    return gs.models.load("cifar10-tiny")


@pytest.mark.parametrize("cell", cells(), ids=lambda c: f"{c['method']}-{c['schedule']}-{c['nfe']}")
def test_sampler_latency(benchmark, net, cell):
    benchmark.group = "nfe-fid-latency"
    benchmark.extra_info["cell"] = f"{cell['method']}/{cell['schedule']}/{cell['nfe']}"
    batch = 4 if benchmark.disabled else int(os.environ.get("GEOSAMPLE_NFE_FID_BATCH", 64))
    noise = torch.randn((batch, *net.shape), generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor(cell["sigmas"], dtype=torch.float64)
    x = benchmark(gs.sample, net, noise, sigmas, solver=cell["solver"])
    assert x.shape == noise.shape and bool(torch.isfinite(x).all())
    calls = gs.solvers.nfe(cell["solver"], len(sigmas) - 1, denoise_to_zero=float(sigmas[-1]) == 0.0)
    assert calls == cell["nfe"]


def test_nfe_fid_study_runs(tmp_path, monkeypatch):
    """Not a measurement: nfe_fid.py end to end on a tiny image tar with pixel features (smoke):
    cells (EDM, GITS, the floor), resume (a second run computes nothing), latency, report files."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import nfe_fid
    from bench_studies import tiny_image_tar

    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    data = tiny_image_tar(tmp_path / "tiny.tar", per_class=8, side=32)
    argv = ["--data", str(data), "--features", "pixel", "--num", "6", "--methods", "ipndm",
            "--schedules", "polynomial,gits", "--nfes", "4", "--floor", "ipndm:8", "--num-warmup", "2",
            "--bootstrap", "2", "--latency-batch", "2", "--out", str(tmp_path / "out")]
    assert nfe_fid.main(["--stage", "cells", *argv]) == 0
    report = json.loads((tmp_path / "out" / "nfe_fid.json").read_text())
    assert [(c["schedule"], c["nfe"]) for c in report["cells"]] == [("polynomial", 4), ("floor", 8), ("gits", 4)]
    assert all(c["fid"] > 0 and c["num"] == 6 for c in report["cells"])
    gits = report["cells"][2]
    assert gits["setup_s"] > 0 and gits["sigmas"] != report["cells"][0]["sigmas"]
    chunks = sorted((tmp_path / "cache" / "fid" / "features").glob("*/00000.npy"))
    assert len(chunks) == 4                                   # the reference and three cells
    stamps = [p.stat().st_mtime_ns for p in chunks]
    assert nfe_fid.main(["--stage", "all", *argv]) == 0       # resumed: no chunk written again
    assert [p.stat().st_mtime_ns for p in chunks] == stamps
    report = json.loads((tmp_path / "out" / "nfe_fid.json").read_text())
    assert report["inception"]["images"] == 16 + 3 * 6        # features timed once: the resumed run read them
    assert all(c["latency_ms_per_image"] > 0 for c in report["cells"])
    md = (tmp_path / "out" / "nfe_fid.md").read_text()
    assert md.startswith("### FID vs NFE") and "**Reduced study**: 6 samples per cell against 16 reference" in md
    assert (tmp_path / "out" / "nfe_fid.png").stat().st_size > 0
