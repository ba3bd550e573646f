#include "kernels/cell_fused_cuda.h"

namespace pnewton {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_cell_kernel(FusedCellParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N * p.D) return;
  fused_cell_element<T>(p, i / p.D, i % p.D);
}

}  // namespace

cudaError_t fused_cell_cuda(const FusedCellParams& p, DType dtype, cudaStream_t stream) {
  const int64_t n = p.N * p.D;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  switch (dtype) {
    case DType::f32: fused_cell_kernel<float><<<blocks, kThreads, 0, stream>>>(p); break;
    case DType::f64: fused_cell_kernel<double><<<blocks, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace pnewton
