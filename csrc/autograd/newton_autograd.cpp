// Autograd kernels of the solver's ops. newton_rnn: the forward redispatches below
// autograd and saves the solution; the backward is newton_rnn_backward (the exact adjoint).
// The Newton iterations themselves are never differentiated. newton_rnn_backward is
// differentiable in turn (double backward): when its result is to be differentiated it runs
// its kernel's ATen code with grad mode on. elk_step, the inner step of pnewton.solve, is not
// differentiable and says so.
#include <torch/autograd.h>
#include <torch/library.h>

#include "csrc/autograd/needs_graph.h"
#include "csrc/solver/newton.h"

namespace pnewton {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardSig = Outputs(c10::string_view, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const at::Tensor&, c10::string_view, int64_t, double, double, double, double,
                           c10::string_view, const c10::optional<at::Tensor>&, bool, bool, c10::string_view,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, c10::string_view, bool);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, c10::string_view, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, c10::string_view, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view, bool);

c10::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class NewtonRNNFunction : public torch::autograd::Function<NewtonRNNFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, std::string cell, const at::Tensor& gi, const at::Tensor& W_hh,
                               const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, std::string method,
                               int64_t max_iter, double atol, double rtol, double damping, double clip,
                               std::string init, const c10::optional<at::Tensor>& init_states,
                               bool fixed_iterations, bool fallback, std::string adjoint,
                               const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& W_hr,
                               const c10::optional<at::Tensor>& resets, std::string group, bool reversed_ranks) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("pnewton::newton_rnn", "").typed<ForwardSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [states, iterations, residual, converged, path] =
        op.call(cell, gi, W_hh, b_hh, s0, method, max_iter, atol, rtol, damping, clip, init, init_states,
                fixed_iterations, fallback, adjoint, lengths, W_hr, resets, group, reversed_ranks);
    ctx->save_for_backward({gi, W_hh, b_hh.value_or(at::Tensor()), s0, states, lengths.value_or(at::Tensor()),
                            W_hr.value_or(at::Tensor()), resets.value_or(at::Tensor())});
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["adjoint"] = adjoint;
    ctx->saved_data["group"] = group;
    ctx->saved_data["reversed_ranks"] = reversed_ranks;
    // Without the fallback a sequence may be returned unconverged (tolerance mode synchronises
    // anyway; fixed_iterations is documented instead, to stay free of host reads).
    if (!fallback && !fixed_iterations) ctx->saved_data["converged"] = converged;
    ctx->mark_non_differentiable({iterations, residual, converged, path});
    return {states, iterations, residual, converged, path};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("pnewton::newton_rnn_backward", "").typed<BackwardSig>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& b_hh = saved[2];
    const at::Tensor& lengths = saved[5];
    const at::Tensor& W_hr = saved[6];
    const at::Tensor& resets = saved[7];
    at::Tensor grad = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(saved[4]);
    if (ctx->saved_data.count("converged") && !ctx->saved_data["converged"].toTensor().all().item<bool>()) {
      TORCH_WARN_ONCE("pnewton.newton_rnn: gradients of sequences that did not converge (fallback=False) are the "
                      "exact adjoint evaluated at their unconverged states, not the gradient of those states; "
                      "stats.converged flags them");
    }
    auto [grad_gi, grad_W, grad_b, grad_s0, grad_W_hr] =
        op.call(grad, ctx->saved_data["cell"].toStringRef(), saved[0], saved[1], optional(b_hh), saved[3], saved[4],
                ctx->saved_data["adjoint"].toStringRef(), optional(lengths), optional(W_hr), optional(resets),
                ctx->saved_data["group"].toStringRef(), ctx->saved_data["reversed_ranks"].toBool());
    variable_list grads(21);  // one per forward argument after ctx
    grads[1] = grad_gi;
    grads[2] = grad_W;
    grads[3] = b_hh.defined() ? grad_b : at::Tensor();
    grads[4] = grad_s0;
    grads[17] = W_hr.defined() ? grad_W_hr : at::Tensor();
    return grads;
  }
};

Outputs newton_rnn_autograd(c10::string_view cell, const at::Tensor& gi, const at::Tensor& W_hh,
                            const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, c10::string_view method,
                            int64_t max_iter, double atol, double rtol, double damping, double clip,
                            c10::string_view init, const c10::optional<at::Tensor>& init_states, bool fixed_iterations,
                            bool fallback, c10::string_view adjoint, const c10::optional<at::Tensor>& lengths,
                            const c10::optional<at::Tensor>& W_hr, const c10::optional<at::Tensor>& resets,
                            c10::string_view group, bool reversed_ranks) {
  auto out = NewtonRNNFunction::apply(std::string(cell), gi, W_hh, b_hh, s0, std::string(method), max_iter, atol,
                                      rtol, damping, clip, std::string(init), init_states, fixed_iterations, fallback,
                                      std::string(adjoint), lengths, W_hr, resets, std::string(group),
                                      reversed_ranks);
  return {out[0], out[1], out[2], out[3], out[4]};
}

using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardOutputs newton_rnn_backward_autograd(const at::Tensor& grad_states, c10::string_view cell,
                                             const at::Tensor& gi, const at::Tensor& W_hh,
                                             const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0,
                                             const at::Tensor& states, c10::string_view adjoint,
                                             const c10::optional<at::Tensor>& lengths,
                                             const c10::optional<at::Tensor>& W_hr,
                                             const c10::optional<at::Tensor>& resets, c10::string_view group,
                                             bool reversed_ranks) {
  if (needs_graph({grad_states, gi, W_hh, b_hh, s0, states, W_hr})) {
    return newton_rnn_backward_kernel(grad_states, cell, gi, W_hh, b_hh, s0, states, adjoint, lengths, W_hr, resets,
                                      group, reversed_ranks);
  }
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pnewton::newton_rnn_backward", "").typed<BackwardSig>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_states, cell, gi, W_hh, b_hh, s0, states, adjoint, lengths, W_hr, resets, group,
                 reversed_ranks);
}

class ElkStepFunction : public torch::autograd::Function<ElkStepFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& a, const at::Tensor& r, const at::Tensor& lam,
                            bool smooth) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::elk_step", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(a, r, lam, smooth);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "pnewton.elk_step is not differentiable: it is the inner step of pnewton.solve, which "
                "differentiates the solution by its adjoint, never through its iterations");
  }
};

at::Tensor elk_step_autograd(const at::Tensor& a, const at::Tensor& r, const at::Tensor& lam, bool smooth) {
  return ElkStepFunction::apply(a, r, lam, smooth);
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, Autograd, m) {
  m.impl("newton_rnn", &newton_rnn_autograd);
  m.impl("newton_rnn_backward", &newton_rnn_backward_autograd);
  m.impl("elk_step", &elk_step_autograd);
}

}  // namespace pnewton
