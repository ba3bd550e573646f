// CUDA kernels of the scan ops. This is a .cpp file: torch headers are parsed by the host
// compiler only, and the kernels in kernels/scan_cuda.cu see nothing but ScanParams.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "csrc/scan.h"
#include "kernels/scan_cuda.h"

namespace pnewton {
namespace {

// Tuning and testing switches, read at each call: PNEWTON_CUDA_SCAN=chunked|single_pass
// forces one algorithm (unset or auto: single_pass where it applies);
// PNEWTON_SINGLE_PASS_STEPS picks the steps per thread (k = 1: 8, 16, 32; k = 2: 4, 8).
CudaScanOptions requested_options() {
  CudaScanOptions o;
  const char* env = std::getenv("PNEWTON_CUDA_SCAN");
  const std::string name = env == nullptr ? "auto" : env;
  if (name == "chunked") {
    o.algorithm = CudaScanAlgorithm::chunked;
  } else if (name == "single_pass") {
    o.algorithm = CudaScanAlgorithm::single_pass;
  } else {
    TORCH_CHECK(name == "auto" || name.empty(), "pnewton: PNEWTON_CUDA_SCAN must be auto, single_pass or chunked, got '",
                name, "'");
  }
  const char* steps = std::getenv("PNEWTON_SINGLE_PASS_STEPS");
  if (steps != nullptr) o.single_pass_steps = std::atoi(steps);
  o.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return o;
}

void run_scan_cuda(const ScanOperands& ops) {
  const c10::cuda::CUDAGuard guard(ops.x.device());
  // Blocks too large for a thread's registers (dense Jacobians of wide cells): batched
  // matmuls by recursive doubling instead.
  if (ops.b.size(3) > kMaxCudaBlock) return scan_by_doubling(ops);
  const ScanParams p = scan_params(ops);
  const DType dtype = scan_dtype(ops.x.scalar_type());
  const CudaScanOptions options = requested_options();
  // Scratch from the caching allocator, on the current stream.
  at::Tensor scratch = at::empty({static_cast<int64_t>(scan_cuda_scratch_bytes(p, dtype, options))},
                                 ops.x.options().dtype(at::kByte));
  C10_CUDA_CHECK(scan_cuda(p, dtype, options, scratch.data_ptr(), at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CUDA, m) { register_scan_kernels<run_scan_cuda>(m); }

}  // namespace pnewton
