"""The build: ctest of the C++ core, find_package from an outside project, and the pure-Python fallback."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None or shutil.which("c++") is None,
                                 reason="cmake or a C++ compiler is missing")


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def core_build(tmp_path_factory):
    """The core and its tests built once, Release, into a temporary directory (about 10 s on 2 cores)."""
    build = tmp_path_factory.mktemp("build")
    run(CMAKE, "-S", ROOT, "-B", build, "-DGEOSAMPLE_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_INSTALL_PREFIX={build / 'prefix'}")
    run(CMAKE, "--build", build, "--parallel", "2")
    return build


@needs_cmake
def test_ctest_passes(core_build):
    out = run("ctest", "--output-on-failure", cwd=core_build).stdout
    assert "100% tests passed" in out


@needs_cmake
def test_find_package_from_outside_project(core_build, tmp_path):
    run(CMAKE, "--install", core_build)
    prefix = core_build / "prefix"
    assert (prefix / "include" / "geosample" / "geosample.hpp").is_file()
    run(CMAKE, "-S", ROOT / "csrc" / "examples", "-B", tmp_path, f"-DCMAKE_PREFIX_PATH={prefix}",
        "-DCMAKE_BUILD_TYPE=Release")
    run(CMAKE, "--build", tmp_path)
    exe = next(p for p in tmp_path.rglob("embed*") if p.is_file() and os.access(p, os.X_OK))
    out = run(exe).stdout
    assert "GITS indices: 0 " in out and " 60\n" in out
    assert "dpmpp  nfe=20" in out


def test_pure_python_when_cpp_disabled():
    code = ("import torch, geosample as gs; assert not gs.has_cpp(); "
            "x = gs.sample(lambda x, s: 0.5 * x, torch.ones(2, 3), gs.schedules.polynomial(4), 'unipc'); "
            "assert x.shape == (2, 3) and bool(torch.isfinite(x).all()); print(gs.__file__)")
    env = {**os.environ, "GEOSAMPLE_NO_CPP": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
