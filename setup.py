"""Drives the CMake build (CMakeLists.txt is the single source) and installs ``pnewton``.

    pip install --no-build-isolation -e .

Environment: PNEWTON_BUILD_DIR (default ./build), PNEWTON_CPU_ONLY=1 (skip CUDA even when
nvcc is found), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (parallel compile jobs).
"""
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
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, "libpnewton.so"), target)


setup(
    name="pnewton",
    version="0.1.0",
    description="Parallel Newton methods for nonlinear RNNs as PyTorch operators",
    packages=["pnewton"],
    package_dir={"pnewton": "torch_ops"},
    ext_modules=[CMakeExtension("pnewton._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.9,<2.12"],  # requirements.txt: the tested range
)
