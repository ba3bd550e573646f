#pragma once
// CUDA scans: launchers take a params struct and a stream and return the CUDA error.
// No torch here; scratch memory comes from the caller (the PyTorch allocator in csrc/).
#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/scan_params.h"

namespace pnewton {

// Largest block size the CUDA scans accept (blocks are held in registers/local memory).
constexpr int kMaxCudaBlock = 32;

// How the time axis is cut on the GPU: enough chunks that B·H·chunks threads fill
// the device, each chunk at least a few dozen steps long.
int64_t cuda_time_chunks(const ScanParams& p, int num_sms);

// Bytes of scratch that scan_cuda needs for `time_chunks` chunks.
size_t scan_cuda_scratch_bytes(const ScanParams& p, DType dtype, int64_t time_chunks);

// Runs the scan: per-chunk aggregates, a carry across chunks, a rescan of every chunk.
cudaError_t scan_cuda(const ScanParams& p, DType dtype, int64_t time_chunks, void* scratch,
                      cudaStream_t stream);

}  // namespace pnewton
