import os

import pytest
import torch

# The layers' auto chooses between the parallel solve and torch's fused loop by measuring
# (csrc/solver/auto_plan.h). The suite tests the solver: auto means its parallel stages here,
# and the tests of the choice itself (test_auto_plan.py) set PNEWTON_AUTO=measure.
os.environ.setdefault("PNEWTON_AUTO", "parallel")

import pnewton  # noqa: F401  (loads the ops)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and pnewton.built_with_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of pnewton")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
