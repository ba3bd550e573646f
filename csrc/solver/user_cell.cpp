// User cells (pnewton/cell.h): autograd defaults for their Jacobians, and pnewton::solve,
// which runs the same Newton solver as the built-in cells and reattaches gradients at the
// solution through the exact adjoint.
#include <torch/autograd.h>

#include "csrc/checks.h"
#include "csrc/solver/newton.h"
#include "pnewton/cell.h"

namespace pnewton {

at::Tensor CellFunction::transpose_product(const at::Tensor& s, const at::Tensor& u, const at::Tensor& v) const {
  at::AutoGradMode enable(true);
  const at::Tensor s_ = s.detach().requires_grad_(true);
  const at::Tensor F = step(s_, u.detach());
  // A step that ignores s (F carries no graph to it) has ∂f/∂s = 0.
  if (!F.requires_grad()) return at::zeros_like(s);
  const at::Tensor g = torch::autograd::grad({F}, {s_}, {v}, /*retain_graph=*/false, /*create_graph=*/false,
                                             /*allow_unused=*/true)[0];
  return g.defined() ? g : at::zeros_like(s);
}

at::Tensor CellFunction::jacobian(const at::Tensor& s, const at::Tensor& u, JacobianPart part) const {
  // Row i of ∂f/∂s is (∂f/∂s)ᵀ e_i: S transpose products.
  const int64_t N = s.size(0), S = s.size(1);
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < S; ++i) {
    rows.push_back(transpose_product(s, u, at::one_hot(at::full({N}, i, s.options().dtype(at::kLong)), S).to(s.dtype())));
  }
  const at::Tensor J = at::stack(rows, 1);
  if (part == JacobianPart::dense) return J;
  if (part == JacobianPart::diagonal) return J.diagonal(0, 1, 2);
  const int64_t k = block_width(part, *this);
  TORCH_CHECK(k > 0 && S % k == 0, "pnewton: ", k, "x", k, " blocks need a state size divisible by ", k, ", got ", S);
  // Block b is J[kb:kb+k, kb:kb+k].
  return J.view({N, S / k, k, S / k, k}).diagonal(0, 1, 3).permute({0, 3, 1, 2});
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Identity forward; backward maps g to λ_t = g_t + A_{t+1}ᵀ λ_{t+1} with the true Jacobian.
class UserAdjoint : public torch::autograd::Function<UserAdjoint> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& F, const at::Tensor& s_prev,
                            const at::Tensor& u_flat, int64_t cell_address, int64_t adjoint) {
    ctx->save_for_backward({s_prev, u_flat});
    // The cell is a C++ object the caller keeps alive (documented in pnewton/cell.h).
    ctx->saved_data["cell"] = cell_address;
    ctx->saved_data["adjoint"] = adjoint;
    return F.clone();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The cell's Jacobians are evaluated at detached states: differentiating this backward
    // would silently miss their dependence on the solution and the parameters.
    TORCH_CHECK(!at::GradMode::is_enabled(), "pnewton::solve: double backward (create_graph=True) is not supported "
                "for user cells; newton_rnn and the layers support it");
    const auto saved = ctx->get_saved_variables();
    const auto* cell = reinterpret_cast<const CellFunction*>(ctx->saved_data["cell"].toInt());
    const at::Tensor lambda = solve_adjoint(*cell, saved[0], saved[1], grads[0].contiguous(),
                                            static_cast<Adjoint>(ctx->saved_data["adjoint"].toInt()));
    return {lambda, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, SolveStats> solve(const CellFunction& cell, const at::Tensor& s0, const at::Tensor& inputs,
                                         const SolverOptions& options) {
  constexpr const char* op = "pnewton::solve";
  check_floating(op, "s0", s0, 2, "[B, S]");
  TORCH_CHECK(s0.size(1) == cell.state_size(), op, ": s0 must be [B, ", cell.state_size(), "], got ", s0.sizes());
  TORCH_CHECK(inputs.defined() && inputs.dim() >= 2 && inputs.size(0) == s0.size(0), op,
              ": inputs must be [B, T, ...] with B = ", s0.size(0), ", got ", inputs.sizes());
  check_like(op, "inputs", inputs, s0, "s0", /*same_dtype=*/false);
  TORCH_CHECK(options.init != "states", op, ": init='states' is not available here");
  const NewtonOptions o = newton_options(options);
  const Adjoint adjoint = parse_adjoint(options.adjoint);

  NewtonResult r;
  {
    at::NoGradGuard no_grad;
    r = newton_solve(cell, inputs.detach(), s0.detach(), o);
  }
  SolveStats stats{r.iterations, r.residual, r.converged, r.path};
  const int64_t T = inputs.size(1);
  if (!at::GradMode::is_enabled() || T == 0) return {r.states, stats};
  // Reattach gradients at the solution: F = f(s*_{t-1}, u_t) carries the graph to s0 (through
  // step 1), the inputs and the cell's parameters; the adjoint maps g to λ.
  const at::Tensor s_prev = at::cat({s0.unsqueeze(1), r.states.narrow(1, 0, T - 1)}, 1).flatten(0, 1);
  const at::Tensor u_flat = inputs.flatten(0, 1);
  const at::Tensor F = cell.step(s_prev, u_flat).view(r.states.sizes());
  if (!F.requires_grad()) return {r.states, stats};
  const at::Tensor out = UserAdjoint::apply(F, s_prev.detach(), u_flat.detach(),
                                            reinterpret_cast<int64_t>(&cell), static_cast<int64_t>(adjoint));
  return {out + (r.states - out).detach(), stats};
}

}  // namespace pnewton
