"""Loads libpnewton, the one shared library that registers every ``torch.ops.pnewton`` op.

Before loading it, checks that the running torch is one it can load: the library is
compiled against one torch's C++ ABI (``_build.json``, written by setup.py, records which),
and loading it under another minor version or another CUDA major fails with undefined
symbols or a crash instead of a message.
"""
import glob
import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _read_build():
    path = os.path.join(_HERE, "_build.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


built = _read_build()


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


def check_torch(built, torch_version, torch_cuda):
    """Raise ImportError when a library built against ``built`` (``{"torch": "2.11.0+cu130",
    "cuda": "13.0" or None}``) cannot be loaded under ``torch_version``/``torch_cuda``: torch's
    C++ ABI changes between minor versions, and a CUDA build needs the CUDA major it linked."""
    if not built:
        return
    problems = []
    if _major_minor(built["torch"]) != _major_minor(torch_version):
        problems.append(f"torch {'.'.join(_major_minor(built['torch']))}.x")
    if (built["cuda"] or "none").split(".")[0] != (torch_cuda or "none").split(".")[0]:
        cuda_major = (built["cuda"] or "").split(".")[0]
        problems.append(f"a torch built with CUDA {cuda_major}.x" if cuda_major else "a CPU-only torch")
    if problems:
        raise ImportError(
            f"pnewton was built against torch {built['torch']} (CUDA {built['cuda'] or 'none'}), but this "
            f"environment has torch {torch_version} (CUDA {torch_cuda or 'none'}); its C++ library cannot be "
            f"loaded under it. Install {' and '.join(problems)}, or rebuild pnewton against this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps <pnewton source or sdist>")


def _library_path():
    override = os.environ.get("PNEWTON_LIBRARY")
    if override:
        return override  # a developer's choice: not checked
    check_torch(built, torch.__version__, torch.version.cuda)
    found = glob.glob(os.path.join(_HERE, "lib", "libpnewton.so")) + sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    if not found:
        raise ImportError(
            "pnewton: the compiled library is missing from " + _HERE + "; build it with "
            "`pip install --no-build-isolation -e .` (see README.md)"
        )
    return found[0]


def _has_op(name):
    try:
        getattr(torch.ops.pnewton, name)
        return True
    except (AttributeError, RuntimeError):
        return False


# A LibTorch program that already linked libpnewton has the ops: load only once.
loaded_from = "linked into the process"
if not _has_op("scan_diag"):
    loaded_from = _library_path()
    torch.ops.load_library(loaded_from)

# True when the library was built with its CUDA kernels (nvcc was found at build time).
built_with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("pnewton::scan_diag", "CUDA")

# The folder to put on CMAKE_PREFIX_PATH for find_package(pnewton) (as
# torch.utils.cmake_prefix_path for find_package(Torch)): inside the package for a regular
# install or wheel, the build folder's install tree for an editable one; None when unknown.
cmake_prefix_path = os.path.join(_HERE, "lib", "cmake") if os.path.isdir(os.path.join(_HERE, "lib", "cmake")) \
    else built.get("cmake_prefix_path")
