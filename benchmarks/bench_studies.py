"""The quality studies run end to end on a tiny image set (CI runs this file with the benchmarks).

Not a measurement: it checks that ``nfe_quality.py`` builds its model, solves the reference, searches
GITS, fills every reachable cell with finite errors and writes its json/md/png atomically."""
from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import nfe_quality  # noqa: E402


def tiny_image_tar(path: Path, per_class: int = 12, side: int = 8) -> Path:
    """A tar of ``side`` x ``side`` RGB PNGs laid out <class>/<file>, two classes, seeded."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for c, name in enumerate(("cat", "dog")):
            for i in range(per_class):
                img = np.clip(rng.normal(80 + 90 * c, 40, (side, side, 3)), 0, 255).astype(np.uint8)
                blob = io.BytesIO()
                Image.fromarray(img).save(blob, format="PNG")
                info = tarfile.TarInfo(f"{name}/{i:03d}.png")
                info.size = blob.tell()
                blob.seek(0)
                tar.addfile(info, blob)
    return path


@pytest.mark.parametrize("model", ["gaussian", "mog"])
def test_nfe_quality_runs(tmp_path, monkeypatch, model):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    data = tiny_image_tar(tmp_path / "tiny.tar")
    rc = nfe_quality.main(["--model", model, "--data", str(data), "--resolution", "8", "--rank", "4",
                           "--batch", "4", "--solvers", "euler,heun", "--nfes", "3,4", "--num-warmup", "4",
                           "--kid-real", "8", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / f"nfe_quality_{model}.json").read_text())
    cells = {(r["solver"], r["schedule"], r["nfe"]) for r in report["results"]}
    assert cells == {(s, sc, n) for s, n in (("euler", 3), ("euler", 4), ("heun", 4))
                     for sc in ("polynomial", "logsnr", "gits")}
    assert all(math.isfinite(r["rmse"]) and r["rmse"] > 0 for r in report["results"])
    assert (tmp_path / "out" / f"nfe_quality_{model}.md").read_text().startswith(f"### {model}")
    assert (tmp_path / "out" / f"nfe_quality_{model}.png").stat().st_size > 0


def test_nfe_quality_flow_row(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    data = tiny_image_tar(tmp_path / "tiny.tar")
    assert nfe_quality.main(["--model", "flow", "--data", str(data), "--resolution", "8", "--rank", "4",
                             "--batch", "4", "--solvers", "euler", "--nfes", "3,5", "--num-warmup", "4",
                             "--kid-real", "0", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "nfe_quality_flow.json").read_text())
    assert {(r["schedule"], r["nfe"]) for r in report["results"]} == {(s, n) for s in ("sd3", "gits") for n in (3, 5)}
    for r in report["results"]:
        assert r["sigmas"][0] == math.inf and r["sigmas"][-1] == 0.0 and math.isfinite(r["rmse"])
