"""The package refuses, with a message, to load its C++ library under a torch it was not built
for (torch's C++ ABI changes between minor versions; a CUDA build needs its CUDA major), and
says where its CMake package is. scripts/test_wheel.sh tests the wheel itself."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pnewton
from pnewton._library import check_torch


@pytest.mark.parametrize("built,torch_version,torch_cuda,fine", [
    ({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.11.0+cu130", "13.0", True),
    ({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.11.1+cu130", "13.2", True),   # patch releases keep the ABI
    ({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.10.0+cu130", "13.0", False),  # another minor version
    ({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.11.0+cpu", None, False),      # CPU-only torch
    ({"torch": "2.11.0+cu130", "cuda": "13.0"}, "2.11.0+cu126", "12.6", False),  # another CUDA major
    ({"torch": "2.10.0+cpu", "cuda": None}, "2.10.0+cu128", "12.8", False),
    ({"torch": "2.10.0", "cuda": None}, "2.10.0", None, True),
])
def test_check_torch_refuses_what_cannot_load(built, torch_version, torch_cuda, fine):
    if fine:
        check_torch(built, torch_version, torch_cuda)
        return
    with pytest.raises(ImportError, match="pnewton was built against torch .* this environment has torch "
                                          + torch_version.replace("+", r"\+")):
        check_torch(built, torch_version, torch_cuda)


def _library_file():
    return os.environ.get("PNEWTON_LIBRARY") or pnewton._library.loaded_from


@pytest.mark.skipif(not os.path.exists(_library_file()), reason="the library is linked into the process")
@pytest.mark.parametrize("minor_shift", [0, 1])
def test_import_refuses_a_torch_of_another_minor_version(tmp_path, minor_shift):
    """The package as installed (its .py files and library), with _build.json recording this
    torch or the next minor version, imported in a fresh process."""
    package = tmp_path / "pnewton"
    package.mkdir()
    for source in glob.glob(os.path.join(os.path.dirname(pnewton.__file__), "*.py")):
        shutil.copy(source, package)
    os.symlink(os.path.realpath(_library_file()), package / "_C.so")
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    (package / "_build.json").write_text(json.dumps(
        {"torch": f"{major}.{int(minor) + minor_shift}.0", "cuda": torch.version.cuda, "cmake_prefix_path": None}))
    env = {k: v for k, v in os.environ.items() if k not in ("PNEWTON_LIBRARY", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", "import pnewton, torch; print(pnewton.__file__, hasattr(torch.ops.pnewton, 'scan_diag'))"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    if minor_shift == 0:
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(str(package)) and out.stdout.strip().endswith("True"), out.stdout
    else:
        assert out.returncode != 0
        assert f"ImportError: pnewton was built against torch {major}.{int(minor) + 1}.0" in out.stderr, out.stderr
        assert f"Install torch {major}.{int(minor) + 1}.x" in out.stderr, out.stderr


def test_cmake_prefix_path_holds_the_package_config_when_known():
    if pnewton.cmake_prefix_path is None:
        pytest.skip("built without setup.py (no _build.json)")
    assert os.path.exists(os.path.join(pnewton.cmake_prefix_path, "pnewton", "pnewtonConfig.cmake"))
