// Autograd kernels of the scan ops: the forward redispatches below autograd and saves
// (A, x, x0); the backward is the backward op (the transposed, shifted reverse scan).
// The backward ops are differentiable too (double backward: gradient penalties,
// Hessian-vector products): the backward of a scan is a scan, so when their result is to be
// differentiated they solve the adjoint with the differentiable scan ops instead of the
// kernels' shifted scan, and autograd records the rest.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "csrc/autograd/needs_graph.h"
#include "csrc/scan.h"
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

// λ_t = g_t + C_{t+1}ᵀ λ_{t+1} (reverse: C_{t−1}ᵀ λ_{t−1}) by the scan ops on shifted views.
at::Tensor differentiable_adjoint(const at::Tensor& g, const at::Tensor& A, bool reverse, bool transpose) {
  const int64_t T = g.size(1);
  if (T <= 1) return g.clone();
  if (!reverse) {
    const at::Tensor head = scan_block(A.narrow(1, 1, T - 1), g.narrow(1, 0, T - 1), g.select(1, T - 1),
                                       /*reverse=*/true, !transpose);
    return at::cat({head, g.narrow(1, T - 1, 1)}, 1);
  }
  const at::Tensor tail = scan_block(A.narrow(1, 0, T - 1), g.narrow(1, 1, T - 1), g.select(1, 0),
                                     /*reverse=*/false, !transpose);
  return at::cat({g.narrow(1, 0, 1), tail}, 1);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Grads scan_block_backward_autograd(const at::Tensor& grad_x, const at::Tensor& A, const at::Tensor& x,
                                   const std::optional<at::Tensor>& x0, bool reverse, bool transpose) {
  if (!needs_graph({grad_x, A, x, x0})) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::scan_block_backward", "")
                         .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(grad_x, A, x, x0, reverse, transpose);
  }
  check_block_backward_args("pnewton.scan_block_backward", grad_x, A, x, x0);
  return scan_gradients(differentiable_adjoint(grad_x, A, reverse, transpose), A, x, x0, reverse, transpose);
}

Grads scan_diag_backward_autograd(const at::Tensor& grad_x, const at::Tensor& a, const at::Tensor& x,
                                  const std::optional<at::Tensor>& x0, bool reverse) {
  if (!needs_graph({grad_x, a, x, x0})) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::scan_diag_backward", "")
                         .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(grad_x, a, x, x0, reverse);
  }
  check_diag_backward_args("pnewton.scan_diag_backward", grad_x, a, x, x0);
  // The diagonal scan is the block scan with k = 1.
  const std::optional<at::Tensor> x0_block =
      x0.has_value() ? std::optional<at::Tensor>(x0->unsqueeze(-1)) : std::nullopt;
  auto [grad_A, grad_b, grad_x0] =
      scan_block_backward_autograd(grad_x.unsqueeze(-1), a.unsqueeze(-1).unsqueeze(-1), x.unsqueeze(-1), x0_block,
                                   reverse, false);
  return {grad_A.squeeze(-1).squeeze(-1), grad_b.squeeze(-1), grad_x0.squeeze(-1)};
}

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
  m.impl("scan_diag_backward", &scan_diag_backward_autograd);
  m.impl("scan_block_backward", &scan_block_backward_autograd);
}

}  // namespace pnewton
