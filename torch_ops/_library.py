"""Loads libpnewton, the one shared library that registers every ``torch.ops.pnewton`` op."""
import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _library_path():
    override = os.environ.get("PNEWTON_LIBRARY")
    if override:
        return override
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
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
