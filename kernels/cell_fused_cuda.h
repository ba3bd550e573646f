#pragma once
// The fused cell evaluation (kernels/cell_fused.h) as one CUDA kernel: a thread per
// (row, channel). No torch here.
#include <cuda_runtime_api.h>

#include "kernels/cell_fused.h"

namespace pnewton {

// f32 and f64; returns the launch error.
cudaError_t fused_cell_cuda(const FusedCellParams& p, DType dtype, cudaStream_t stream);

}  // namespace pnewton
