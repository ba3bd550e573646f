"""Drives the CMake build (CMakeLists.txt is the single source) and installs ``pnewton``.

    pip install --no-build-isolation -e .    # development: the library is copied into torch_ops/
    pip install --no-build-isolation .       # or `pip wheel --no-build-isolation .`: a package that
                                             # holds the library, the headers and the CMake config

An editable install puts the library beside the sources as ``_C*.so``. A regular install or a
wheel holds CMake's install tree inside the package (``pnewton/lib/libpnewton.so``,
``pnewton/include``, ``pnewton/lib/cmake/pnewton``), so a LibTorch program finds it with
``find_package(pnewton)`` and ``CMAKE_PREFIX_PATH=$(python -c 'import pnewton;
print(pnewton.cmake_prefix_path)')``. Either way ``_build.json`` records the torch the library
was built against; importing pnewton under a torch it cannot load refuses with a clear
message (torch_ops/_library.py).

Environment: PNEWTON_BUILD_DIR (default ./build), PNEWTON_CPU_ONLY=1 (skip CUDA even when
nvcc is found), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (parallel compile jobs).
"""
import json
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _torch_build():
    """The torch this build compiles against (the one CMakeLists.txt finds with this Python)."""
    out = subprocess.check_output([sys.executable, "-c",
                                   "import json, torch; print(json.dumps({'torch': torch.__version__, "
                                   "'cuda': torch.version.cuda}))"], text=True)
    return json.loads(out.strip().splitlines()[-1])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.path.abspath(os.environ.get("PNEWTON_BUILD_DIR", os.path.join(ROOT, "build")))
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")) and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure)
        build = ["cmake", "--build", build_dir]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.check_call(build)
        target = self.get_ext_fullpath(ext.name)
        package_dir = os.path.dirname(target)
        os.makedirs(package_dir, exist_ok=True)
        editable = self.inplace or getattr(self, "editable_mode", False)
        # CMake's install tree: lib/libpnewton.so, include/pnewton, lib/cmake/pnewton. A regular
        # install or wheel holds it inside the package (the library Python loads is its
        # lib/libpnewton.so; CMakeLists.txt sets the RPATH for this layout); an editable one
        # keeps it in the build folder and copies the library beside the sources as _C*.so.
        prefix = os.path.join(build_dir, "install") if editable else package_dir
        subprocess.check_call(["cmake", "--install", build_dir, "--prefix", prefix])
        if editable:
            shutil.copyfile(os.path.join(build_dir, "libpnewton.so"), target)
        # What the library was built against, read before it is loaded (torch_ops/_library.py).
        built = {**_torch_build(), "cmake_prefix_path": os.path.join(prefix, "lib", "cmake") if editable else None}
        with open(os.path.join(os.path.join(ROOT, "torch_ops") if editable else package_dir, "_build.json"), "w") as f:
            json.dump(built, f, indent=1)


setup(
    name="pnewton",
    version="0.1.0",
    description="Parallel Newton methods for nonlinear RNNs as PyTorch operators",
    packages=["pnewton"],
    package_dir={"pnewton": "torch_ops"},
    ext_modules=[CMakeExtension("pnewton._C")],
    cmdclass={"build_ext": CMakeBuild},
    # setuptools' staging, apart from CMake's build folder (./build by default).
    options={"build": {"build_base": "build-setuptools"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.9,<2.12"],  # requirements.txt: the tested range
)
