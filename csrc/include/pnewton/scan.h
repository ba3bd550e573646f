#pragma once
// Public C++ API of the scan ops. Calls go through the dispatcher, so autograd and
// CPU/CUDA dispatch behave exactly as from Python (torch.ops.pnewton.*).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace pnewton {

// x_t = a_t ⊙ x_{t-1} + b_t over [B, T, D]; reverse runs t = T..1 with x_{T+1} = x0.
inline at::Tensor scan_diag(const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& x0 = std::nullopt, bool reverse = false) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pnewton::scan_diag", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  return op.call(a, b, x0, reverse);
}

// x_t = A_t x_{t-1} + b_t per block: A [B, T, H, k, k], b [B, T, H, k]; A_tᵀ if transpose.
inline at::Tensor scan_block(const at::Tensor& A, const at::Tensor& b,
                             const std::optional<at::Tensor>& x0 = std::nullopt, bool reverse = false,
                             bool transpose = false) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pnewton::scan_block", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool, bool)>();
  return op.call(A, b, x0, reverse, transpose);
}

}  // namespace pnewton
