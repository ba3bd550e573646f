"""What a bug report needs: ``pnewton.show_config()`` (``python -m pnewton.info`` prints it).

The library's build (its version, the torch and CUDA it was built with, the CUDA
architectures and CPU capabilities compiled) beside what runs now (torch, the devices, the
CPU capability ATen dispatches to, which the fused CPU pass follows, and the threads).
"""
import platform

import torch

from . import _library


def build_info():
    """The library's build as a dict: version, torch, cuda, cuda_archs, cpu_capabilities,
    compiler, build_type (csrc/build_info.cpp)."""
    return dict(line.split("=", 1) for line in torch.ops.pnewton.build_info())


def show_config():
    """The build and the running environment, as text (also printed by ``python -m pnewton.info``)."""
    from . import __version__

    b = build_info()
    cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    running = torch.__version__.split("+")[0]
    lines = [
        f"pnewton {__version__} ({_library.loaded_from})",
        "built with:",
        f"  torch {b['torch']}, CUDA {b['cuda']}, CUDA architectures {b['cuda_archs'] or 'none'}",
        f"  CPU capabilities {b['cpu_capabilities']}, {b['compiler']}, {b['build_type'] or 'default'} build",
        f"  CUDA kernels: {'yes' if _library.built_with_cuda else 'no'}",
        "running:",
        f"  Python {platform.python_version()} on {platform.machine()} {platform.system()}",
        f"  torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
        + ("" if running == b["torch"] else f"  [differs from the build's torch {b['torch']}]"),
        f"  CUDA devices: {', '.join(cuda_devices) if cuda_devices else 'none'}",
        f"  CPU capability in use: {torch.backends.cpu.get_cpu_capability()} (ATen's; the fused CPU pass follows it)",
        f"  threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
    ]
    parallel = [line.strip() for line in torch.__config__.parallel_info().splitlines()
                if line.startswith(("ATen parallel backend", "OpenMP", "MKL"))]
    lines += [f"  {line}" for line in parallel]
    return "\n".join(lines)
