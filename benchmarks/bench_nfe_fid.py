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
