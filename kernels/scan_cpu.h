#pragma once
// CPU scans. Threading is the caller's: it passes a parallel-for (at::parallel_for in
// csrc/, a plain loop in the kernel tests), so this code stays free of torch.
#include <cstdint>
#include <functional>

#include "kernels/scan_params.h"

namespace pnewton {

// parallel_for(begin, end, body): calls body(b, e) on disjoint subranges covering [begin, end).
using ParallelFor =
    std::function<void(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body)>;

// How the work is cut. Each task scans a tile of `tile_heads` blocks of one batch row;
// with time_chunks > 1 the time axis is cut too (aggregate per chunk, carry across
// chunks, rescan each chunk from its carry), so short-and-wide and long-and-narrow
// problems both keep every thread busy.
struct CpuSchedule {
  int64_t tile_heads = 1;
  int64_t time_chunks = 1;
};

CpuSchedule default_cpu_schedule(const ScanParams& p, int num_threads);

// Runs the scan described by p. dtype must be f32 or f64 (callers widen fp16/bf16).
void scan_cpu(const ScanParams& p, DType dtype, const CpuSchedule& schedule, const ParallelFor& parallel_for);

}  // namespace pnewton
