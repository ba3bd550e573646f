#pragma once
// The fused passes of a Newton iteration on the CPU (kernels/cell_fused.h's math over
// at::vec vectors), compiled once per CPU capability that ATen dispatches to (CMakeLists.txt).
#include <cstdint>
#include <string>

#include "kernels/cell_fused.h"

namespace pnewton::cpu {

#define PNEWTON_DECLARE_FUSED_CELL_ROWS(capability)                                          \
  namespace capability {                                                                     \
  /* Rows [begin, end) of the pass, row maxima included; f32 and f64. */                     \
  void fused_cell_rows(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end);  \
  void newton_update_rows(const NewtonUpdateParams& p, DType dtype, int64_t begin, int64_t end); \
  /* Tasks [begin, end) of fused_loop_cpu. */                                                 \
  void fused_loop_lanes(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end);   \
  }
PNEWTON_DECLARE_FUSED_CELL_ROWS(DEFAULT)
PNEWTON_DECLARE_FUSED_CELL_ROWS(AVX2)
PNEWTON_DECLARE_FUSED_CELL_ROWS(AVX512)
#undef PNEWTON_DECLARE_FUSED_CELL_ROWS

// The capability ATen's own kernels use (at::get_cpu_capability, so ATEN_CPU_CAPABILITY
// applies): csrc/cpu/cell_dispatch.cpp.
void fused_cell_cpu(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end);
void newton_update_cpu(const NewtonUpdateParams& p, DType dtype, int64_t begin, int64_t end);
// The loop of a per-channel cell (kernels/cell_fused.h, fused_loop_channel) over tasks
// [begin, end): task i steps channels [16·(i mod ⌈D/16⌉), +16) of sequence i / ⌈D/16⌉ (16:
// a whole number of vectors of any width ATen has).
constexpr int64_t kLoopChannels = 16;
void fused_loop_cpu(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end);

}  // namespace pnewton::cpu
