// pnewton.solve's cell: a Python step function, reached through the ops user_step and
// user_jacobian, whose kernels torch_ops/solve.py registers in Python and which look the
// function up by a handle for the duration of one call. So pnewton.solve runs this
// library's one solver (methods, auto's stages, the stop test, NaN handling, the fallback,
// the diagnostics and the adjoints), the same as the built-in and C++ user cells.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "csrc/checks.h"
#include "csrc/solver/newton.h"
#include "pnewton/cell.h"

namespace pnewton {
namespace {

JacobianPart part_of(const char* op, int64_t code) {
  TORCH_CHECK_VALUE(code == static_cast<int64_t>(JacobianPart::diagonal) || code == static_cast<int64_t>(JacobianPart::dense),
                    op, ": structure must be 0 (diagonal) or 2 (dense), got ", code);
  return static_cast<JacobianPart>(code);
}

class CallbackCell : public CellFunction {
 public:
  CallbackCell(int64_t handle, JacobianPart structure, int64_t state_size, bool cheap_diagonal = true)
      : handle_(handle), structure_(structure), state_size_(state_size), cheap_diagonal_(cheap_diagonal) {}

  int64_t state_size() const override { return state_size_; }
  JacobianPart structure() const override { return structure_; }
  bool has_blocks() const override { return false; }
  bool cheap_diagonal() const override { return cheap_diagonal_; }

  at::Tensor step(const at::Tensor& s, const at::Tensor& u) const override {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::user_step", "")
                         .typed<at::Tensor(int64_t, const at::Tensor&, const at::Tensor&)>();
    return op.call(handle_, s, u);
  }

  // The diagonal or the dense Jacobian by the Python side (the user's jacobian= or torch.func).
  at::Tensor jacobian(const at::Tensor& s, const at::Tensor& u, JacobianPart part) const override {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pnewton::user_jacobian", "")
                         .typed<at::Tensor(int64_t, const at::Tensor&, const at::Tensor&, int64_t)>();
    TORCH_CHECK(part != JacobianPart::block2, "pnewton.solve: 2x2 blocks (block_deer) are not available for a ",
                "Python step function");
    // A diagonal structure's Jacobian is its diagonal: the dense part is never formed.
    const JacobianPart asked = structure_ == JacobianPart::diagonal ? JacobianPart::diagonal : part;
    const at::Tensor J = op.call(handle_, s, u, static_cast<int64_t>(asked));
    if (part == JacobianPart::dense && asked == JacobianPart::diagonal) return at::diag_embed(J);
    return J;
  }

 private:
  int64_t handle_;
  JacobianPart structure_;
  int64_t state_size_;
  bool cheap_diagonal_;  // false: the Python side forms the diagonal from the whole Jacobian
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve_user(
    int64_t handle, int64_t structure, const at::Tensor& s0, const at::Tensor& inputs, c10::string_view method,
    int64_t max_iter, double atol, double rtol, double damping, double clip, c10::string_view init,
    const c10::optional<at::Tensor>& init_states, bool fallback, bool cheap_diagonal) {
  constexpr const char* op = "pnewton.solve";
  check_floating(op, "s0", s0, 2, "[B, D]");
  TORCH_CHECK_VALUE(inputs.dim() >= 2 && inputs.size(0) == s0.size(0), op, ": inputs must be [B, T, ...] with B = ",
                    s0.size(0), ", got shape ", inputs.sizes());
  TORCH_CHECK_VALUE(inputs.device() == s0.device(), op, ": inputs must be on the device of s0 (", s0.device(),
                    "), got ", inputs.device());
  NewtonOptions o = newton_options(
      solver_options(method, max_iter, atol, rtol, damping, clip, init, /*fixed_iterations=*/false, fallback, "auto"));
  if (o.init == "states") {
    TORCH_CHECK_VALUE(init_states.has_value() &&
                          init_states->sizes() == at::IntArrayRef({s0.size(0), inputs.size(1), s0.size(1)}),
                      op, ": init must be a [B, T, D] = [", s0.size(0), ", ", inputs.size(1), ", ", s0.size(1),
                      "] warm start");
    o.init_states = init_states->detach().to(s0.options());
  }
  const CallbackCell cell(handle, part_of(op, structure), s0.size(1), cheap_diagonal);
  at::NoGradGuard no_grad;
  NewtonResult r = newton_solve(cell, inputs.detach(), s0.detach(), o);
  return {r.states, r.iterations, r.residual, r.converged, r.path};
}

at::Tensor solve_user_adjoint(int64_t handle, int64_t structure, const at::Tensor& s_prev, const at::Tensor& u,
                              const at::Tensor& g, c10::string_view adjoint) {
  constexpr const char* op = "pnewton.solve (backward)";
  // The Jacobians are evaluated at detached states: a graph of this backward would miss
  // their dependence on the solution and on f's parameters.
  TORCH_CHECK(!at::GradMode::is_enabled(), op, ": double backward (create_graph=True) is not supported for ",
              "pnewton.solve; pnewton.newton_rnn and the layers are twice differentiable");
  const CallbackCell cell(handle, part_of(op, structure), g.size(2));
  return solve_adjoint(cell, s_prev, u, g.contiguous(), parse_adjoint(std::string(adjoint)));
}

}  // namespace

// Composite (above autograd): the callbacks' Python kernels then run with autograd and
// torch.func as a plain call of f would, which the Jacobians and the adjoint's products need.
TORCH_LIBRARY_IMPL(pnewton, CompositeImplicitAutograd, m) {
  m.impl("solve_user", &solve_user);
  m.impl("solve_user_adjoint", &solve_user_adjoint);
}

}  // namespace pnewton
