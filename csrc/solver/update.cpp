#include "csrc/solver/update.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "csrc/cpu/cell_kernels.h"
#include "csrc/solver/cells.h"
#include "kernels/cell_fused.h"
#if PNEWTON_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "kernels/cell_fused_cuda.h"
#endif

namespace pnewton {
namespace {

#if PNEWTON_WITH_CUDA
constexpr bool kCudaKernels = true;
#else
constexpr bool kCudaKernels = false;
#endif

}  // namespace

at::Tensor max_over_time(const at::Tensor& x) {
  return x.size(1) == 0 ? at::zeros({x.size(0)}, x.options()) : x.amax(1);
}

std::pair<at::Tensor, at::Tensor> take_step(const at::Tensor& s, const at::Tensor& x, double sign,
                                            const at::Tensor& moving, const at::Tensor& padding,
                                            Workspace* workspace) {
  const int64_t B = s.size(0), T = s.size(1), S = s.size(2);
  const bool fused = (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) && plain(s, s) && plain(x, s) &&
                     (s.is_cpu() || kCudaKernels);
  if (!fused) {
    const at::Tensor masked = padding.defined() ? x.masked_fill(padding, 0) : x;
    const at::Tensor next = at::nan_to_num(sign > 0 ? s + masked : s - masked, 0.0, 0.0, 0.0);
    // max_t |x_t| per sequence, NaN propagating (an empty time shard: 0).
    const at::Tensor step = T == 0 ? at::zeros({B}, s.options()) : masked.abs().amax({1, 2});
    return {at::where(moving.view({B, 1, 1}), next, s), step};
  }
  const at::Tensor s_c = s.contiguous(), x_c = x.contiguous(), moving_c = moving.contiguous();
  const at::Tensor pad = padding.defined() ? padding.contiguous() : at::Tensor();
  at::Tensor next = empty_in(workspace, {B, T, S}, s_c.options()), row_step = empty_in(workspace, {B, T}, s_c.options());
  NewtonUpdateParams p;
  p.N = B * T, p.T = T, p.S = S, p.sign = sign;
  p.s = s_c.const_data_ptr(), p.x = x_c.const_data_ptr(), p.moving = moving_c.const_data_ptr<bool>();
  p.padding = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  p.next = next.mutable_data_ptr(), p.row_step = row_step.mutable_data_ptr();
  const DType dtype = s.scalar_type() == at::kFloat ? DType::f32 : DType::f64;
  RECORD_FUNCTION("pnewton::newton_update", std::vector<c10::IValue>());
  if (s.is_cpu()) {
    at::parallel_for(0, B * T, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(S, 1)),
                     [&](int64_t begin, int64_t end) { cpu::newton_update_cpu(p, dtype, begin, end); });
  } else {
#if PNEWTON_WITH_CUDA
    C10_CUDA_CHECK(newton_update_cuda(p, dtype, at::cuda::getCurrentCUDAStream()));
#endif
  }
  return {next, max_over_time(row_step)};
}

}  // namespace pnewton
