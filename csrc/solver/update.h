#pragma once
// The Newton step's update of the states (DESIGN §1, step 3), with the per-sequence size
// of the step that the stop test reads: one fused pass on the CPU (at::vec) and on CUDA
// (kernels/cell_fused.h), ATen ops elsewhere (and under torch.func transforms).
#include <ATen/ATen.h>

#include <utility>

#include "csrc/solver/workspace.h"

namespace pnewton {

// next = s + sign·x with non-finite numbers reset to 0, for the moving sequences (s for the
// others), x counted as 0 on padding; and max_t |x_t| per sequence (NaN propagating).
// s, x [B, T, S]; moving [B] bool; padding [B, T, 1] bool or undefined.
std::pair<at::Tensor, at::Tensor> take_step(const at::Tensor& s, const at::Tensor& x, double sign,
                                            const at::Tensor& moving, const at::Tensor& padding,
                                            Workspace* workspace);

// max over t of x [B, T] per sequence (0 for an empty time shard).
at::Tensor max_over_time(const at::Tensor& x);

}  // namespace pnewton
