// CUDA kernels of the scan ops. This is a .cpp file: torch headers are parsed by the host
// compiler only, and the kernels in kernels/scan_cuda.cu see nothing but ScanParams.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/scan.h"
#include "kernels/scan_cuda.h"

namespace pnewton {
namespace {

void run_scan_cuda(const ScanOperands& ops) {
  TORCH_CHECK(ops.b.size(3) <= kMaxCudaBlock, "pnewton.scan_block: CUDA scans support block sizes k <= ",
              kMaxCudaBlock, ", got k = ", ops.b.size(3));
  const c10::cuda::CUDAGuard guard(ops.x.device());
  const ScanParams p = scan_params(ops);
  const DType dtype = scan_dtype(ops.x.scalar_type());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunks = cuda_time_chunks(p, num_sms);
  // Scratch from the caching allocator, on the current stream.
  at::Tensor scratch = at::empty({static_cast<int64_t>(scan_cuda_scratch_bytes(p, dtype, chunks))},
                                 ops.x.options().dtype(at::kByte));
  C10_CUDA_CHECK(scan_cuda(p, dtype, chunks, scratch.data_ptr(), at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CUDA, m) { register_scan_kernels<run_scan_cuda>(m); }

}  // namespace pnewton
