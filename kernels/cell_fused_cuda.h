#pragma once
// The fused passes of a Newton iteration (kernels/cell_fused.h) as CUDA kernels: a thread
// per channel of a row, the row's reductions combined by warp shuffles into one partial
// result per warp (fused_row_parts). No torch here.
#include <cuda_runtime_api.h>

#include "kernels/cell_fused.h"

namespace pnewton {

// The partial results per row of the cell pass's row reductions over `width` channels: one
// per warp of the row (rows up to 32 wide: one), at most 8 (longer rows loop within 256
// threads). The update's row maxima come whole (one warp per row).
inline int64_t fused_row_parts(int64_t width) {
  const int64_t warps = (width + 31) / 32;
  return warps < 1 ? 1 : warps > 8 ? 8 : warps;
}

// The cell pass, row reductions included; f32 and f64; returns the launch error.
cudaError_t fused_cell_cuda(const FusedCellParams& p, DType dtype, cudaStream_t stream);
// The cell's VJP (fused_vjp_row_share); f32 and f64.
cudaError_t fused_vjp_cuda(const FusedVjpParams& p, DType dtype, cudaStream_t stream);
// The loop of a per-channel cell (fused_loop_channel): a thread per channel of a sequence;
// f32 and f64.
cudaError_t fused_loop_cuda(const FusedCellParams& p, DType dtype, cudaStream_t stream);
// The Newton update (s + sign·x, non-finite reset, max |x| per row); f32 and f64.
cudaError_t newton_update_cuda(const NewtonUpdateParams& p, DType dtype, cudaStream_t stream);

}  // namespace pnewton
