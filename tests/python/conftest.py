import pytest
import torch

import pnewton  # noqa: F401  (loads the ops)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and pnewton.built_with_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of pnewton")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
