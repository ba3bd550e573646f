// Autograd kernels of the scan ops: the forward redispatches below autograd and saves
// (A, x, x0); the backward is the backward op (the transposed, shifted reverse scan).
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "pnewton/scan.h"

namespace pnewton {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class ScanDiagFunction : public torch::autograd::Function<ScanDiagFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& x0, bool reverse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor x = scan_diag(a, b, x0, reverse);
    ctx->save_for_backward({a, x, x0.value_or(at::Tensor())});
    ctx->saved_data["reverse"] = reverse;
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::scan_diag_backward", "")
                         .typed<decltype(backward_op)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x0 = saved[2];
    auto [grad_a, grad_b, grad_x0] =
        op.call(grad_outputs[0], saved[0], saved[1], optional_of(x0), ctx->saved_data["reverse"].toBool());
    return {grad_a, grad_b, x0.defined() ? grad_x0 : at::Tensor(), at::Tensor()};
  }

 private:
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&,
                                                                    const std::optional<at::Tensor>&, bool);
};

class ScanBlockFunction : public torch::autograd::Function<ScanBlockFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& A, const at::Tensor& b,
                            const std::optional<at::Tensor>& x0, bool reverse, bool transpose) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor x = scan_block(A, b, x0, reverse, transpose);
    ctx->save_for_backward({A, x, x0.value_or(at::Tensor())});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["transpose"] = transpose;
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::scan_block_backward", "")
                         .typed<decltype(backward_op)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x0 = saved[2];
    auto [grad_A, grad_b, grad_x0] =
        op.call(grad_outputs[0], saved[0], saved[1], optional_of(x0), ctx->saved_data["reverse"].toBool(),
                ctx->saved_data["transpose"].toBool());
    return {grad_A, grad_b, x0.defined() ? grad_x0 : at::Tensor(), at::Tensor(), at::Tensor()};
  }

 private:
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&,
                                                                    const std::optional<at::Tensor>&, bool, bool);
};

at::Tensor scan_diag_autograd(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                              bool reverse) {
  return ScanDiagFunction::apply(a, b, x0, reverse);
}

at::Tensor scan_block_autograd(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                               bool reverse, bool transpose) {
  return ScanBlockFunction::apply(A, b, x0, reverse, transpose);
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, Autograd, m) {
  m.impl("scan_diag", &scan_diag_autograd);
  m.impl("scan_block", &scan_block_autograd);
}

}  // namespace pnewton
