// The kernels of newton_rnn / newton_rnn_backward: the argument checks at the op boundary
// (shared with their meta kernels, below), dtype handling, then the solver. The solver is
// written over ATen and the scan ops, so the same function serves CPU and CUDA, and the
// backward is differentiable when run with grad mode on (csrc/autograd: double backward).
#include <torch/library.h>

#include "csrc/checks.h"
#include "csrc/solver/newton.h"
#include "csrc/solver/segments.h"

namespace pnewton {
namespace {

constexpr const char* kOp = "pnewton.newton_rnn";
constexpr const char* kBackwardOp = "pnewton.newton_rnn_backward";

// fp16/bf16 are solved in fp32: Newton residuals need more precision than they carry.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

c10::optional<at::Tensor> widen(const c10::optional<at::Tensor>& t, at::ScalarType type) {
  return t.has_value() ? c10::optional<at::Tensor>(t->to(type)) : c10::nullopt;
}

// Checks the cell's tensors (one dtype, one device, the shapes the cell implies) and the
// optional per-sequence ones; returns the cell's sizes. Reads no data.
CellShape checked_args(const char* op, c10::string_view cell, const at::Tensor& gi, const at::Tensor& W_hh,
                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0,
                       const c10::optional<at::Tensor>& W_hr, const c10::optional<at::Tensor>& lengths,
                       const c10::optional<at::Tensor>& resets, const char* state_name = "s0") {
  check_floating(op, "gi", gi, 3, "[B, T, G]");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"W_hh", &W_hh},
                                {"b_hh", b_hh ? &*b_hh : nullptr}, {"W_hr", W_hr ? &*W_hr : nullptr},
                                {state_name, &s0}}) {
    if (t == nullptr) continue;
    check_floating(op, name, *t);
    check_like(op, name, *t, gi, "gi");
  }
  const CellKind kind = parse_cell(std::string(cell));
  const CellShape shape = cell_shape(op, kind, W_hh, b_hh, W_hr);
  TORCH_CHECK(gi.sym_size(2) == shape.gate_size, op, ": gi must have ", shape.gate_size, " features (the gates of '",
              cell_name(kind), "' with hidden size ", shape.hidden, "), got shape ", gi.sym_sizes());
  check_shape(op, state_name, s0, {gi.sym_size(0), shape.state_size}, "[B, S]");
  if (lengths.has_value()) lengths_on(op, *lengths, gi.sym_size(0), gi.device());
  if (resets.has_value()) checked_resets(op, *resets, gi.sym_size(0), gi.sym_size(1), gi.device());
  return shape;
}

NewtonOptions checked_options(const at::Tensor& gi, const CellShape& shape, c10::string_view method,
                              int64_t max_iter, double atol, double rtol, double damping, double clip,
                              c10::string_view init, const c10::optional<at::Tensor>& init_states,
                              bool fixed_iterations, bool fallback, c10::string_view adjoint) {
  NewtonOptions o = newton_options(
      solver_options(method, max_iter, atol, rtol, damping, clip, init, fixed_iterations, fallback, adjoint));
  TORCH_CHECK(init_states.has_value() == (o.init == "states"), kOp, ": init_states ",
              o.init == "states" ? "is required by" : "is only for", " init='states'");
  if (init_states.has_value()) {
    check_floating(kOp, "init_states", *init_states);
    check_like(kOp, "init_states", *init_states, gi, "gi", /*same_dtype=*/false);
    check_shape(kOp, "init_states", *init_states, {gi.sym_size(0), gi.sym_size(1), shape.state_size}, "[B, T, S]");
  }
  return o;
}

void check_backward_tensors(const at::Tensor& grad_states, const at::Tensor& gi, const at::Tensor& states,
                            const CellShape& shape) {
  const std::vector<c10::SymInt> expected{gi.sym_size(0), gi.sym_size(1), shape.state_size};
  check_operand(kBackwardOp, "states", states, expected, "[B, T, S]", gi, "gi");
  check_operand(kBackwardOp, "grad_states", grad_states, expected, "[B, T, S]", gi, "gi");
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What sequence parallelism supports, checked on every rank alike (before any collective).
void check_sharded(const char* op, c10::string_view group, c10::string_view method, c10::string_view cell) {
  if (group.empty()) return;
  // The ELK step composes across shards for a diagonal Jacobian approximation: the quasi
  // methods, and elk/elk_filter of diag_gru (whose Jacobian is diagonal).
  const Method m = parse_method(std::string(method));
  TORCH_CHECK((m != Method::elk && m != Method::elk_filter) || parse_cell(std::string(cell)) == CellKind::diag_gru, op,
              ": method '", method, "' of cell '", cell, "' does not run over time shards (a process group): the ELK ",
              "step of a non-diagonal Jacobian does not compose across shards yet; use quasi_elk or quasi_elk_filter");
}

Outputs newton_rnn_kernel(c10::string_view cell_name_, const at::Tensor& gi, const at::Tensor& W_hh,
                          const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, c10::string_view method,
                          int64_t max_iter, double atol, double rtol, double damping, double clip,
                          c10::string_view init, const c10::optional<at::Tensor>& init_states, bool fixed_iterations,
                          bool fallback, c10::string_view adjoint, const c10::optional<at::Tensor>& lengths,
                          const c10::optional<at::Tensor>& W_hr, const c10::optional<at::Tensor>& resets,
                          c10::string_view group, bool reversed_ranks) {
  CellShape shape;
  NewtonOptions o;
  auto checks = [&] {
    shape = checked_args(kOp, cell_name_, gi, W_hh, b_hh, s0, W_hr, lengths, resets);
    o = checked_options(gi, shape, method, max_iter, atol, rtol, damping, clip, init, init_states, fixed_iterations,
                        fallback, adjoint);
    check_sharded(kOp, group, method, cell_name_);
  };
  // Over time shards every rank raises together (solver_shards).
  const std::string error = group.empty() ? (checks(), std::string()) : failed_checks(checks);
  o.shards = solver_shards(kOp, group, reversed_ranks, gi, s0, error, [&] {
    return std::vector<int64_t>{static_cast<int64_t>(o.method), o.max_iter, o.fixed_iterations, o.fallback,
                                init_states.has_value(), resets.has_value(), W_hr.has_value(),
                                static_cast<int64_t>(parse_cell(std::string(cell_name_)))};
  }, lengths);
  const at::ScalarType type = compute_type(gi.scalar_type());
  const Cell cell(parse_cell(std::string(cell_name_)), W_hh.to(type), widen(b_hh, type), widen(W_hr, type));
  if (init_states.has_value()) o.init_states = init_states->to(type);
  // Lengths count the whole sequence's steps (over time shards too).
  const int64_t steps = o.shards ? o.shards->total() : gi.size(1);
  if (lengths.has_value()) o.lengths = checked_lengths(kOp, *lengths, gi.size(0), steps, gi.device());
  if (resets.has_value()) o.resets = checked_resets(kOp, *resets, gi.size(0), gi.size(1), gi.device());
  NewtonResult r = newton_solve(cell, gi.to(type), s0.to(type), o);
  return {r.states.to(gi.scalar_type()), r.iterations, r.residual.to(gi.scalar_type()), r.converged, r.path};
}

Outputs newton_rnn_meta(c10::string_view cell_name_, const at::Tensor& gi, const at::Tensor& W_hh,
                        const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, c10::string_view method,
                        int64_t max_iter, double atol, double rtol, double damping, double clip, c10::string_view init,
                        const c10::optional<at::Tensor>& init_states, bool fixed_iterations, bool fallback,
                        c10::string_view adjoint, const c10::optional<at::Tensor>& lengths,
                        const c10::optional<at::Tensor>& W_hr, const c10::optional<at::Tensor>& resets,
                        c10::string_view group, bool reversed_ranks) {
  const CellShape shape = checked_args(kOp, cell_name_, gi, W_hh, b_hh, s0, W_hr, lengths, resets);
  checked_options(gi, shape, method, max_iter, atol, rtol, damping, clip, init, init_states, fixed_iterations,
                  fallback, adjoint);
  check_sharded(kOp, group, method, cell_name_);
  const c10::SymInt B = gi.sym_size(0);
  return {at::empty_symint({B, gi.sym_size(1), shape.state_size}, gi.options()),
          at::empty_symint({B}, gi.options().dtype(at::kLong)), at::empty_symint({B}, gi.options()),
          at::empty_symint({B}, gi.options().dtype(at::kBool)), at::empty_symint({B}, gi.options().dtype(at::kLong))};
}

Outputs newton_rnn_backward_meta(const at::Tensor& grad_states, c10::string_view cell_name_, const at::Tensor& gi,
                                 const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0,
                                 const at::Tensor& states, c10::string_view adjoint,
                                 const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& W_hr,
                                 const c10::optional<at::Tensor>& resets, c10::string_view group,
                                 bool reversed_ranks) {
  const CellShape shape = checked_args(kBackwardOp, cell_name_, gi, W_hh, b_hh, s0, W_hr, lengths, resets);
  check_backward_tensors(grad_states, gi, states, shape);
  parse_adjoint(std::string(adjoint));
  check_sharded(kBackwardOp, group, "auto", cell_name_);
  return {at::empty_like(gi, at::MemoryFormat::Contiguous), at::empty_like(W_hh, at::MemoryFormat::Contiguous),
          at::empty_symint({shape.gate_size}, gi.options()), at::empty_like(s0, at::MemoryFormat::Contiguous),
          W_hr.has_value() ? at::empty_like(*W_hr, at::MemoryFormat::Contiguous)
                           : at::empty_symint({0}, gi.options())};
}

at::Tensor cell_step(c10::string_view cell_name_, const at::Tensor& s, const at::Tensor& gi, const at::Tensor& W_hh,
                     const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& W_hr) {
  constexpr const char* op = "pnewton.cell_step";
  check_floating(op, "gi", gi, 2, "[N, G]");
  check_floating(op, "s", s, 2, "[N, S]");
  TORCH_CHECK(s.sym_size(0) == gi.sym_size(0), op, ": s [N, S] and gi [N, G] must have the same N, got shapes ",
              s.sym_sizes(), " and ", gi.sym_sizes());
  checked_args(op, cell_name_, gi.unsqueeze(1), W_hh, b_hh, s, W_hr, c10::nullopt, c10::nullopt, "s");
  return Cell(parse_cell(std::string(cell_name_)), W_hh, b_hh, W_hr).step(s, gi);
}

}  // namespace

SharedShards solver_shards(const char* op, c10::string_view group, bool reversed_ranks, const at::Tensor& gi,
                           const at::Tensor& s0, const std::string& local_error,
                           const std::function<std::vector<int64_t>()>& options,
                           const c10::optional<at::Tensor>& lengths) {
  if (group.empty()) return nullptr;
  auto shards = std::make_shared<TimeShards>(std::string(group), reversed_ranks);
  std::vector<int64_t> descriptor;
  if (local_error.empty()) {  // (else the arguments may not even have the ranks read here)
    descriptor = {gi.size(0), gi.size(1), gi.size(2), s0.size(1), static_cast<int64_t>(gi.scalar_type())};
    const std::vector<int64_t> more = options();
    descriptor.insert(descriptor.end(), more.begin(), more.end());
    // The lengths count the whole sequence: every rank passes the same (their sum and largest).
    descriptor.push_back(lengths.has_value() ? lengths->sum().item<int64_t>() : -1);
    descriptor.push_back(lengths.has_value() && lengths->numel() ? lengths->max().item<int64_t>() : -1);
  }
  shards->agree(op, descriptor, /*time_index=*/1, gi, local_error);
  return shards;
}

Outputs newton_rnn_backward_kernel(const at::Tensor& grad_states, c10::string_view cell_name_, const at::Tensor& gi,
                                   const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh,
                                   const at::Tensor& s0, const at::Tensor& states, c10::string_view adjoint,
                                   const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& W_hr,
                                   const c10::optional<at::Tensor>& resets, c10::string_view group,
                                   bool reversed_ranks) {
  auto checks = [&] {
    const CellShape shape = checked_args(kBackwardOp, cell_name_, gi, W_hh, b_hh, s0, W_hr, lengths, resets);
    check_backward_tensors(grad_states, gi, states, shape);
    check_sharded(kBackwardOp, group, "auto", cell_name_);
  };
  const std::string error = group.empty() ? (checks(), std::string()) : failed_checks(checks);
  const SharedShards shards = solver_shards(kBackwardOp, group, reversed_ranks, gi, s0, error, [&] {
    return std::vector<int64_t>{resets.has_value(), W_hr.has_value(),
                                static_cast<int64_t>(parse_cell(std::string(cell_name_)))};
  }, lengths);
  const at::ScalarType type = compute_type(gi.scalar_type());
  const Cell cell(parse_cell(std::string(cell_name_)), W_hh.to(type), widen(b_hh, type), widen(W_hr, type));
  const at::Tensor L =
      lengths.has_value()
          ? checked_lengths(kBackwardOp, *lengths, gi.size(0), shards ? shards->total() : gi.size(1), gi.device())
          : at::Tensor();
  const at::Tensor R =
      resets.has_value() ? checked_resets(kBackwardOp, *resets, gi.size(0), gi.size(1), gi.device()) : at::Tensor();
  NewtonGrads g = newton_backward(cell, grad_states.to(type), gi.to(type), s0.to(type), states.to(type),
                                  parse_adjoint(std::string(adjoint)), L, R, shards.get());
  const auto out = gi.scalar_type();
  return {g.gi.to(out), g.W_hh.to(out), g.b_hh.to(out), g.s0.to(out),
          g.W_hr.defined() ? g.W_hr.to(out) : gi.new_empty({0})};
}

TORCH_LIBRARY_IMPL(pnewton, CompositeImplicitAutograd, m) { m.impl("cell_step", &cell_step); }

TORCH_LIBRARY_IMPL(pnewton, CPU, m) {
  m.impl("newton_rnn", &newton_rnn_kernel);
  m.impl("newton_rnn_backward", &newton_rnn_backward_kernel);
}

TORCH_LIBRARY_IMPL(pnewton, CUDA, m) {
  m.impl("newton_rnn", &newton_rnn_kernel);
  m.impl("newton_rnn_backward", &newton_rnn_backward_kernel);
}

// Meta (and so torch.compile's fake tensors): the same checks, the output shapes.
TORCH_LIBRARY_IMPL(pnewton, Meta, m) {
  m.impl("newton_rnn", &newton_rnn_meta);
  m.impl("newton_rnn_backward", &newton_rnn_backward_meta);
}

}  // namespace pnewton
