"""pnewton.show_config() / python -m pnewton.info: what a bug report needs, read from the
library's build (csrc/build_info.cpp) and the running process."""
import os
import subprocess
import sys

import torch

import pnewton
from pnewton._config import build_info


def test_build_info_names_the_torch_it_was_built_with_and_what_it_compiled():
    info = build_info()
    assert set(info) == {"version", "torch", "cuda", "cuda_archs", "cpu_capabilities", "compiler", "build_type"}
    assert info["version"] == pnewton.__version__
    # Built against this environment's torch (the README's build), by major.minor.patch.
    assert info["torch"] == torch.__version__.split("+")[0]
    assert "DEFAULT" in info["cpu_capabilities"].split()
    assert (info["cuda"] != "none") == pnewton.built_with_cuda


def test_show_config_reports_the_build_and_the_running_environment():
    text = pnewton.show_config()
    for needle in (f"pnewton {pnewton.__version__}", f"torch {build_info()['torch']}", "CPU capabilities",
                   f"CPU capability in use: {torch.backends.cpu.get_cpu_capability()}",
                   f"threads: {torch.get_num_threads()} intra-op", f"torch {torch.__version__}"):
        assert needle in text, (needle, text)


def test_python_m_pnewton_info_prints_it():
    out = subprocess.run([sys.executable, "-m", "pnewton.info"], capture_output=True, text=True, env=os.environ,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"pnewton {pnewton.__version__}") and "built with:" in out.stdout
    assert "RuntimeWarning" not in out.stderr
