#pragma once
// CUDA scans: launchers take a params struct and a stream and return the CUDA error.
// No torch here; scratch memory comes from the caller (the PyTorch allocator in csrc/).
#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/scan_chunked.h"
#include "kernels/scan_params.h"

namespace pnewton {

// Largest block size the CUDA scans take: the chunked scan keeps a thread's blocks in
// registers (kernels/scan_chunked.h). Larger blocks (dense Jacobians) go to the
// batched-matmul scan in csrc/ (on the H200 a thread-per-block kernel with k = 32 blocks
// in local memory spent ~0.3 s on the dense adjoint of an LSTM(16) at B = 16, T = 1024).
constexpr int kMaxCudaBlock = kMaxChunkedBlock;

// The two CUDA scans:
//   single_pass (k = 1, 2): one kernel, decoupled look-back across tiles
//     (kernels/scan_single_pass.h): reads every input once, writes every output once.
//   chunked (any k <= kMaxCudaBlock): per-chunk aggregates, a carry across chunks, a rescan
//     of every chunk: reads the inputs twice.
// automatic picks single_pass where it applies; single_pass falls back to chunked elsewhere.
enum class CudaScanAlgorithm { automatic, single_pass, chunked };

struct CudaScanOptions {
  CudaScanAlgorithm algorithm = CudaScanAlgorithm::automatic;
  int single_pass_steps = 0;  // steps per thread: 0 default, else single_pass_steps_supported
  int num_sms = 1;            // multiprocessors of the device (the chunked scan's occupancy)
};

// The algorithm that `requested` runs for p.
CudaScanAlgorithm resolve_cuda_scan(const ScanParams& p, CudaScanAlgorithm requested);

// Bytes of scratch that scan_cuda needs.
size_t scan_cuda_scratch_bytes(const ScanParams& p, DType dtype, const CudaScanOptions& options);

// Runs the scan on `stream`, using `scratch` (scan_cuda_scratch_bytes, any contents).
cudaError_t scan_cuda(const ScanParams& p, DType dtype, const CudaScanOptions& options, void* scratch,
                      cudaStream_t stream);

}  // namespace pnewton
