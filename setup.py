"""Build geosample with its C++ extension geosample._C, compiled by CMake from csrc/.

The extension is built unless the environment variable GEOSAMPLE_NO_CPP=1 is set, which installs
pure Python (``geosample.has_cpp()`` is then False).  Without cmake, a C++17 compiler or
pybind11, or when the build fails, the install stops with an error naming GEOSAMPLE_NO_CPP=1: a
pure-Python install is chosen, never fallen into.  ``python setup.py build_ext --inplace`` (or
``pip install -e . --no-build-isolation``) drops geosample/_C*.so next to the sources.
"""
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).parent.resolve()
NO_CPP = os.environ.get("GEOSAMPLE_NO_CPP", "") not in ("", "0")


def find_cmake():
    """The first ``cmake`` on PATH that runs (pip's build isolation breaks the pip-installed wrapper)."""
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/bin", "/usr/bin"]:
        exe = shutil.which("cmake", path=d)
        if exe and subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
            return exe
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with GEOSAMPLE_BUILD_PYTHON=ON into the extension's path."""

    def run(self):
        if NO_CPP:
            print("geosample: GEOSAMPLE_NO_CPP is set, installing pure Python without geosample._C")
            return self._drop_stale()
        self.cmake = find_cmake()
        try:
            if self.cmake is None:
                raise OSError("no working cmake on PATH")
            super().run()
        except (OSError, ImportError, subprocess.CalledProcessError) as e:
            raise CompileError(
                f"geosample: building the C++ extension geosample._C failed: {e}\n"
                "Install cmake >= 3.15, a C++17 compiler and pybind11 and retry, or install pure "
                "Python explicitly with GEOSAMPLE_NO_CPP=1 (e.g. GEOSAMPLE_NO_CPP=1 pip install .)") from e

    def _drop_stale(self):
        """Remove an extension left in build/ by an earlier build, so a pure install stays pure."""
        for path in glob.glob(os.path.join(self.build_lib, "geosample", "_C*")):
            os.remove(path)

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)  # the cache may name another interpreter
        config = "Debug" if self.debug else "Release"
        subprocess.run([self.cmake, "-S", str(ROOT), "-B", str(build_dir),
                        "-DGEOSAMPLE_BUILD_PYTHON=ON", f"-DCMAKE_BUILD_TYPE={config}",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={out_dir}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DPYBIND11_FINDPYTHON=ON",
                        f"-DPython_EXECUTABLE={sys.executable}"], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([self.cmake, "--build", str(build_dir), "--config", config, "--target", "_C",
                        "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("geosample._C")], cmdclass={"build_ext": CMakeBuild})
