"""Shared timing helper of the benchmark scripts."""
import statistics
import time

import torch


def median_seconds(fn, repeats, device, warm_up=True):
    """Median wall time of fn() over `repeats` runs after one warm-up (first-touch page
    faults, thread-pool start, CUDA context; skip it when the caller just ran fn),
    synchronising the GPU around each run."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if warm_up:
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
