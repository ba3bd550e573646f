// The device kernels of newton_rnn / newton_rnn_backward: argument checks and dtype
// handling at the op boundary, then the solver. The solver is written over ATen and the
// scan ops, so the same function serves CPU and CUDA.
#include <torch/library.h>

#include "csrc/solver/segments.h"
#include "csrc/solver/newton.h"

namespace pnewton {
namespace {

constexpr const char* kOp = "pnewton.newton_rnn";

// fp16/bf16 are solved in fp32: Newton residuals need more precision than they carry.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

c10::optional<at::Tensor> widen(const c10::optional<at::Tensor>& t, at::ScalarType type) {
  return t.has_value() ? c10::optional<at::Tensor>(t->to(type)) : c10::nullopt;
}

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& ref) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, kOp, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", type);
  TORCH_CHECK(type == ref.scalar_type(), kOp, ": ", name, " must have the dtype of gi (", ref.scalar_type(), "), got ",
              type);
  TORCH_CHECK(t.device() == ref.device(), kOp, ": ", name, " must be on the device of gi (", ref.device(), "), got ",
              t.device());
}

// Checks every argument; returns the cell they describe.
Cell checked_cell(const std::string& cell_name_, const at::Tensor& gi, const at::Tensor& W_hh,
                  const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, const c10::optional<at::Tensor>& W_hr) {
  TORCH_CHECK(gi.dim() == 3, kOp, ": gi must be a 3-d tensor [B, T, G], got shape ", gi.sizes());
  check_tensor("gi", gi, gi);
  check_tensor("W_hh", W_hh, gi);
  if (b_hh.has_value()) check_tensor("b_hh", *b_hh, gi);
  if (W_hr.has_value()) check_tensor("W_hr", *W_hr, gi);
  check_tensor("s0", s0, gi);
  const Cell cell(parse_cell(cell_name_), W_hh, b_hh, W_hr);
  TORCH_CHECK(gi.size(2) == cell.gate_size(), kOp, ": gi must have ", cell.gate_size(), " features (the gates of '",
              cell_name(cell.kind()), "' with hidden size ", cell.hidden(), "), got shape ", gi.sizes());
  TORCH_CHECK(s0.dim() == 2 && s0.size(0) == gi.size(0) && s0.size(1) == cell.state_size(), kOp,
              ": s0 must have shape [B, S] = [", gi.size(0), ", ", cell.state_size(), "], got ", s0.sizes());
  return cell;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> newton_rnn_kernel(
    c10::string_view cell_name_, const at::Tensor& gi, const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& s0, c10::string_view method, int64_t max_iter, double atol, double rtol, double damping,
    double clip, c10::string_view init, const c10::optional<at::Tensor>& init_states, bool fixed_iterations,
    bool fallback, c10::string_view adjoint, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& W_hr, const c10::optional<at::Tensor>& resets) {
  checked_cell(std::string(cell_name_), gi, W_hh, b_hh, s0, W_hr);
  NewtonOptions o = newton_options(
      solver_options(method, max_iter, atol, rtol, damping, clip, init, fixed_iterations, fallback, adjoint));
  const at::ScalarType type = compute_type(gi.scalar_type());
  const Cell cell(parse_cell(std::string(cell_name_)), W_hh.to(type), widen(b_hh, type), widen(W_hr, type));
  if (init_states.has_value()) o.init_states = init_states->to(type);
  if (lengths.has_value()) o.lengths = checked_lengths(kOp, *lengths, gi.size(0), gi.size(1), gi.device());
  if (resets.has_value()) o.resets = checked_resets(kOp, *resets, gi.size(0), gi.size(1), gi.device());
  NewtonResult r = newton_solve(cell, gi.to(type), s0.to(type), o);
  return {r.states.to(gi.scalar_type()), r.iterations, r.residual.to(gi.scalar_type()), r.converged, r.path};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> newton_rnn_backward_kernel(
    const at::Tensor& grad_states, c10::string_view cell_name_, const at::Tensor& gi, const at::Tensor& W_hh,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, const at::Tensor& states, c10::string_view adjoint,
    const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& W_hr,
    const c10::optional<at::Tensor>& resets) {
  const Cell checked = checked_cell(std::string(cell_name_), gi, W_hh, b_hh, s0, W_hr);
  const std::vector<int64_t> expected{gi.size(0), gi.size(1), checked.state_size()};
  TORCH_CHECK(states.sizes() == at::IntArrayRef(expected) && grad_states.sizes() == at::IntArrayRef(expected), kOp,
              "_backward: states and grad_states must be [B, T, S] = ", expected, ", got ", states.sizes(), " and ",
              grad_states.sizes());
  const at::ScalarType type = compute_type(gi.scalar_type());
  const Cell cell(checked.kind(), W_hh.to(type), widen(b_hh, type), widen(W_hr, type));
  const at::Tensor L =
      lengths.has_value() ? checked_lengths(kOp, *lengths, gi.size(0), gi.size(1), gi.device()) : at::Tensor();
  const at::Tensor R =
      resets.has_value() ? checked_resets(kOp, *resets, gi.size(0), gi.size(1), gi.device()) : at::Tensor();
  NewtonGrads g = newton_backward(cell, grad_states.to(type), gi.to(type), s0.to(type), states.to(type),
                                  parse_adjoint(std::string(adjoint)), L, R);
  const auto out = gi.scalar_type();
  return {g.gi.to(out), g.W_hh.to(out), g.b_hh.to(out), g.s0.to(out),
          g.W_hr.defined() ? g.W_hr.to(out) : gi.new_empty({0})};
}

at::Tensor cell_step(c10::string_view cell_name_, const at::Tensor& s, const at::Tensor& gi, const at::Tensor& W_hh,
                     const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& W_hr) {
  TORCH_CHECK(s.dim() == 2 && gi.dim() == 2 && s.size(0) == gi.size(0), "pnewton.cell_step: s must be [N, S] and gi "
              "[N, G] with the same N, got shapes ", s.sizes(), " and ", gi.sizes());
  checked_cell(std::string(cell_name_), gi.unsqueeze(1), W_hh, b_hh, s, W_hr);
  return Cell(parse_cell(std::string(cell_name_)), W_hh, b_hh, W_hr).step(s, gi);
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CompositeImplicitAutograd, m) { m.impl("cell_step", &cell_step); }

TORCH_LIBRARY_IMPL(pnewton, CPU, m) {
  m.impl("newton_rnn", &newton_rnn_kernel);
  m.impl("newton_rnn_backward", &newton_rnn_backward_kernel);
}

TORCH_LIBRARY_IMPL(pnewton, CUDA, m) {
  m.impl("newton_rnn", &newton_rnn_kernel);
  m.impl("newton_rnn_backward", &newton_rnn_backward_kernel);
}

}  // namespace pnewton
