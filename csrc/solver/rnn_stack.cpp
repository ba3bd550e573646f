#include "csrc/solver/rnn_stack.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "csrc/checks.h"
#include "csrc/solver/auto_plan.h"
#include "csrc/solver/fused_loop.h"
#include "csrc/solver/segments.h"
#include "csrc/solver/newton.h"

namespace pnewton {
namespace {

using StackOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Whether the stack runs on fake tensors (torch.compile, export) or under functionalization:
// then no value can be read and nothing is timed.
bool is_traced(const at::Tensor& t) {
  return t.is_meta() || t.key_set().has(c10::DispatchKey::Python) || t.key_set().has(c10::DispatchKey::Functionalize);
}

// The fused loop's diagnostics, per (layer, direction) [n, B]: every step computed once (the
// length), converged where the states are finite (residual 0, else NaN). The final states
// tell: in the dense torch.nn cells a non-finite state makes every later state non-finite
// (W_hh mixes all channels), and each direction's final state comes after all its steps.
StackOutputs with_loop_stats(const at::Tensor& output, const at::Tensor& final, const at::Tensor& lengths, int64_t n,
                             bool batch_first) {
  const int64_t B = final.size(1), T = output.size(batch_first ? 1 : 0);
  const at::Tensor converged = final.isfinite().all(-1).all(0);
  const auto long_options = output.options().dtype(at::kLong);
  const at::Tensor steps = lengths.defined() ? lengths.to(long_options) : at::full({B}, T, long_options);
  const at::Tensor residual = at::where(converged, 0.0, NAN).to(output.scalar_type());
  return {output, final, steps.expand({n, B}).contiguous(), residual.expand({n, B}).contiguous(),
          converged.expand({n, B}).contiguous(), at::full({n, B}, method_bit(Method::fused_loop), long_options)};
}

// Dropout between layers with torch.nn's mask for the same seed: drawn in the memory order
// of its time-major output, contiguous; over a packed batch (lengths, sorted as a
// PackedSequence's), over its packed data: the valid steps in time-major order, padding zero.
at::Tensor dropped_out(const at::Tensor& x, double p, const at::Tensor& lengths) {
  if (!lengths.defined()) return at::dropout(x.contiguous(), p, /*train=*/true);
  const at::Tensor valid = valid_steps(lengths, x.sym_size(0), at::kBool).squeeze(-1).transpose(0, 1);  // [T, B]
  const c10::List<std::optional<at::Tensor>> rows{std::optional<at::Tensor>(valid)};
  return at::zeros_like(x, at::MemoryFormat::Contiguous).index_put(rows, at::dropout(x.index(rows), p, true));
}

// One call of the stack: its arguments, read once (checks, sizes, lengths and resets), and
// the two ways to run it: the parallel solve (a loop over layers and directions, one
// newton_rnn each) and torch's fused loop.
struct Stack {
  const char* op = "pnewton.rnn_stack";
  std::string cell, solved_cell;  // solved_cell: lstm_proj for a projected LSTM
  const at::Tensor& input;
  const at::Tensor& state0;
  at::TensorList params;
  bool has_biases, train, bidirectional, batch_first, projected, lstm;
  int64_t num_layers, dirs, per, weights;
  double dropout;
  SolverOptions solver;
  Method requested;
  at::Tensor L, R, reverse_index, padding_mask;  // lengths, resets, their reversal, torch.nn's zero padding
  std::optional<TimeShards> shards;

  void checks(const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& resets) const;
  at::Tensor reversed(const at::Tensor& x) const {
    return reverse_index.defined() ? gather_steps(x, reverse_index) : x.flip(1);
  }
  // One layer's direction d of x [T, B, features]: its hidden outputs [T, B, H] (time-major,
  // in x's order), and its final state and diagnostics appended.
  at::Tensor direction(int64_t layer, int64_t d, const at::Tensor& x, std::vector<at::Tensor>* finals,
                       std::vector<at::Tensor>* stats) const;
  StackOutputs parallel() const;
  // The loop auto weighs against the solve: torch's fused kernels (a torch.nn cell), or the
  // solver's own loop, one pass per layer for a per-channel cell (Cell::loop).
  bool own_loop() const { return cell == "diag_gru" || cell == "diag_lstm"; }
  StackOutputs fused() const {
    if (own_loop()) {  // told as a fused loop (its path bit), not as the solve's fallback
      Stack looped = *this;
      looped.solver.method = "sequential";
      StackOutputs out = looped.parallel();
      std::get<5>(out).fill_(method_bit(Method::fused_loop));
      return out;
    }
    auto [output, final] = fused_loop(cell, input, state0, params, has_biases, num_layers, dropout, train,
                                      bidirectional, batch_first, projected, L);
    return with_loop_stats(output, final, L, num_layers * dirs, batch_first);
  }
};

// Whether auto weighs the solver's own loop of a per-channel cell (diag_gru, diag_lstm:
// one fused pass, Cell::loop) against the solve: on the CPU, where it is about 4× faster
// than the solve (DiagGRU(64), B = 4, T = 16384: 72 vs 299 ms forward on one thread,
// benchmarks/RESULTS.md); on CUDA its kernel is not yet measured, so the solve runs.
bool own_loop_applies(const Stack& stack) {
  return stack.own_loop() && stack.input.is_cpu() && stack.input.numel() > 0;
}

void Stack::checks(const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& resets) const {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(num_layers > 0, op, ": num_layers must be positive, got ", num_layers);
  TORCH_CHECK(dropout >= 0 && dropout <= 1, op, ": dropout must be a probability in [0, 1], got ", dropout);
  check_floating(op, "input", input, 3, "[T, B, in] ([B, T, in] if batch_first)");
  check_floating(op, "state0", state0, 3, "[layers * dirs, B, S]");
  check_like(op, "state0", state0, input, "input");
  for (size_t i = 0; i < params.size(); ++i) {
    check_floating(op, "params", params[i]);
    check_like(op, "params", params[i], input, "input");
  }
  TORCH_CHECK(n == num_layers * dirs * per, op, ": params must hold ", num_layers * dirs * per,
              " tensors (W_ih, W_hh", has_biases ? ", b_ih, b_hh" : "", cell == "lstm" ? "[, W_hr]" : "",
              " per layer and direction), got ", n);
  TORCH_CHECK(state0.dim() == 3 && state0.sym_size(0) == num_layers * dirs, op, ": state0 must be [",
              num_layers * dirs, ", B, S], got ", state0.sym_sizes());
  if (solver.group.empty()) return;
  TORCH_CHECK(!lengths.has_value(), op, ": lengths (packed sequences) are not supported by a stack over time ",
              "shards (a process group); segments (resets) are, and pnewton.newton_rnn takes lengths");
  TORCH_CHECK(!(resets.has_value() && bidirectional), op, ": a bidirectional stack over time shards (a process ",
              "group) takes no resets: its reverse direction would read segments across shards");
}

at::Tensor Stack::direction(int64_t layer, int64_t d, const at::Tensor& x, std::vector<at::Tensor>* finals,
                            std::vector<at::Tensor>* stats) const {
  const int64_t k = (layer * dirs + d) * per;
  const at::Tensor seq = d ? reversed(x.transpose(0, 1)) : x.transpose(0, 1);
  const at::Tensor gi = at::linear(seq, params[k], has_biases ? c10::optional<at::Tensor>(params[k + 2])
                                                             : c10::nullopt);  // one GEMM for all t
  // The reverse direction over time shards: every rank flips its own, in reversed rank order.
  SolverOptions od = solver;
  od.reversed_ranks = d == 1;
  const std::optional<at::Tensor> W_hr = projected ? std::optional<at::Tensor>(params[k + weights]) : std::nullopt;
  auto [states, result] =
      newton_rnn(solved_cell, gi, params[k + 1], has_biases ? std::optional<at::Tensor>(params[k + 3]) : std::nullopt,
                 state0[layer * dirs + d], od, std::nullopt,
                 L.defined() ? c10::optional<at::Tensor>(L) : c10::nullopt,
                 W_hr, R.defined() ? c10::optional<at::Tensor>(R) : c10::nullopt);
  stats[0].push_back(result.iterations), stats[1].push_back(result.residual);
  stats[2].push_back(result.converged), stats[3].push_back(result.path);
  // States hold still past each length, so the last step is every sequence's final state.
  // Over time shards: the last shard's, gathered, so that every rank has the final states.
  // (An empty shard hands on zeros in the states' graph, so that every rank's backward
  // meets this gather after the same nodes: its collectives run in one order everywhere.)
  if (shards) {
    const TimeShards direction = d ? shards->flipped() : *shards;
    finals->push_back(direction.from_last(states.size(1) > 0 ? states.select(1, -1) : states.sum(1)));
  } else {
    finals->push_back(states.select(1, -1));
  }
  // The hidden part of the state (LSTM: h of the interleaved (h_i, c_i) pairs; projected
  // LSTM: the first P of [h | c]).
  at::Tensor h = projected ? states.narrow_symint(-1, 0, W_hr->sym_size(0))
                 : lstm    ? states.unflatten_symint(-1, {states.sym_size(-1) / 2, 2}).select(-1, 0)
                           : states;
  if (d) h = reversed(h);
  return h.transpose(0, 1);
}

// Layers exchange time-major [T, B, features] tensors, as torch.nn's do, so that a
// dropout mask drawn for the same seed is torch.nn's mask.
StackOutputs Stack::parallel() const {
  at::Tensor x = batch_first ? input.transpose(0, 1) : input;
  std::vector<at::Tensor> finals, stats[4];  // iterations, residual, converged, path
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<at::Tensor> outs;
    for (int64_t d = 0; d < dirs; ++d) outs.push_back(direction(layer, d, x, &finals, stats));
    x = outs.size() == 1 ? outs[0] : at::cat(outs, -1);  // one direction: no copy
    if (L.defined()) x = x * padding_mask;  // torch.nn's zero padding
    if (dropout > 0 && train && layer + 1 < num_layers) x = dropped_out(x, dropout, L);
  }
  // Contiguous, as torch.nn's output (one direction's may still be a view of its states).
  return StackOutputs{(batch_first ? x.transpose(0, 1) : x).contiguous(), at::stack(finals), at::stack(stats[0]),
                      at::stack(stats[1]), at::stack(stats[2]), at::stack(stats[3])};
}

// The first call of its shape class: both paths, timed; the faster's result, and the plan
// remembered. In training a call's cost is its forward and its backward (torch.nn's
// backward is a sequential pass too, the parallel one a scan), so both are timed, the
// backward by a gradient of the output that accumulates nothing (the graph is kept for the
// caller's). The loop must be beaten by a clear margin (timings on a shared machine are
// noisy).
StackOutputs measured(const Stack& stack, const std::string& shape_class) {
  std::vector<at::Tensor> differentiable;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : stack.params) {
      if (t.requires_grad()) differentiable.push_back(t);
    }
    for (const at::Tensor* t : {&stack.input, &stack.state0}) {
      if (t->requires_grad()) differentiable.push_back(*t);
    }
  }
  auto timed = [&](bool parallel, double& seconds) {
    const double start = synchronized_seconds(stack.input);
    StackOutputs out = parallel ? stack.parallel() : stack.fused();
    if (!differentiable.empty()) {
      torch::autograd::grad({std::get<0>(out).sum()}, differentiable, {}, /*retain_graph=*/true,
                            /*create_graph=*/false, /*allow_unused=*/true);
    }
    seconds = synchronized_seconds(stack.input) - start;
    return out;
  };
  // One path's result (and graph) at a time, so the probe needs no more memory than the
  // larger of the two: the loop's is dropped before the solve runs, and rerun if it wins.
  // A path's first call in the process pays one-time costs (oneDNN generating its kernels
  // for the loop, a few ms; fresh pages and first kernel calls for the solve), so a close
  // or cheap verdict is checked by timing the loser once more: the solve when it lost by
  // less than 2×, then the loop when it lost and took under 0.1 s or lost by less than 2×.
  // (The solve's result is dropped first and recomputed if it still wins.)
  double loop_seconds = 0, parallel_seconds = 0, again = 0;
  timed(false, loop_seconds);
  StackOutputs solved = timed(true, parallel_seconds);
  if (parallel_seconds >= 0.9 * loop_seconds && parallel_seconds < 2 * loop_seconds) {
    solved = StackOutputs();
    solved = timed(true, again);
    parallel_seconds = std::min(parallel_seconds, again);
  }
  if (parallel_seconds < 0.9 * loop_seconds && (loop_seconds < 0.1 || 2 * parallel_seconds > loop_seconds)) {
    solved = StackOutputs();
    timed(false, again);
    loop_seconds = std::min(loop_seconds, again);
    if (parallel_seconds < 0.9 * loop_seconds) solved = stack.parallel();
  }
  const bool parallel_wins = parallel_seconds < 0.9 * loop_seconds;
  remember_plan(shape_class, parallel_wins ? StackPlan::parallel : StackPlan::fused_loop);
  if (parallel_wins) return solved;
  solved = StackOutputs();
  return stack.fused();
}

// The path of a call: the parallel solve, torch's fused kernels (method="sequential", or
// auto's choice: csrc/solver/auto_plan.h), or the measurement that makes that choice.
StackOutputs run(const Stack& stack) {
  const bool fused_candidate =
      stack.requested == Method::sequential || (stack.requested == Method::automatic && !stack.solver.fixed_iterations);
  // A trace (torch.compile, export: fake tensors) keeps the solver's own ops: torch's fused
  // CPU LSTM (oneDNN's mkldnn_rnn_layer) has no working fake kernel, and a trace can neither
  // time nor read lengths. method="sequential" then runs the solver's loop.
  if (!fused_candidate || is_traced(stack.input) || stack.shards) return stack.parallel();
  // The fused path reads the lengths before any solve checks their values: check them here
  // (one host read, which also gives the shortest length).
  const int64_t steps = stack.input.size(stack.batch_first ? 1 : 0);
  int64_t shortest = steps;
  if (stack.L.defined()) {
    checked_lengths(stack.op, stack.L, stack.input.size(stack.batch_first ? 0 : 1), steps, stack.L.device(), &shortest);
  }
  const bool torch_loop = fused_loop_applies(stack.cell, stack.input, shortest, stack.R);
  // method="sequential" of a cell without torch's kernels: the solver's loop.
  if (stack.requested == Method::sequential) return torch_loop ? stack.fused() : stack.parallel();
  if (!torch_loop && !own_loop_applies(stack)) return stack.parallel();
  const std::string shape_class = stack_class(stack.cell, stack.input, stack.state0, stack.num_layers,
                                              stack.bidirectional, stack.batch_first, stack.L.defined());
  const StackPlan plan = stack_plan(shape_class, steps);
  if (plan == StackPlan::fused_loop) return stack.fused();
  if (plan == StackPlan::parallel) return stack.parallel();
  return measured(stack, shape_class);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& state0, at::TensorList params, bool has_biases,
    int64_t num_layers, double dropout, bool train, bool bidirectional, bool batch_first, c10::string_view method,
    int64_t max_iter, double atol, double rtol, double damping, double clip, c10::string_view init,
    bool fixed_iterations, bool fallback, c10::string_view adjoint, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& resets, c10::string_view group) {
  // As in torch's _VF.lstm, one more tensor per layer and direction is LSTM's projection W_hr.
  const int64_t dirs = bidirectional ? 2 : 1, weights = has_biases ? 4 : 2, n = static_cast<int64_t>(params.size());
  const bool projected = cell == "lstm" && n == num_layers * dirs * (weights + 1);
  const bool lstm = cell == "lstm" || cell == "diag_lstm" || cell == "head_lstm";
  Stack stack{"pnewton.rnn_stack", std::string(cell), projected ? "lstm_proj" : std::string(cell), input, state0,
              params, has_biases, train, bidirectional, batch_first, projected, lstm,
              num_layers, dirs, projected ? weights + 1 : weights, weights, dropout,
              solver_options(method, max_iter, atol, rtol, damping, clip, init, fixed_iterations, fallback, adjoint),
              Method::automatic};
  stack.solver.group = std::string(group);
  // A call over time shards agrees on its shapes at run time, by a collective: a trace
  // (torch.compile, export) has no values to exchange.
  TORCH_CHECK(group.empty() || !is_traced(input), stack.op, ": a layer with a sequence_group (sequence parallelism ",
              "over process group '", group, "') cannot be traced by torch.compile or torch.export: its ranks agree ",
              "on the shapes at run time; call it outside the compiled region (torch.compiler.disable)");
  // Sequence parallelism: input, resets and output are this rank's time shard; every rank
  // agrees on the rest first (csrc/distributed/time_shards.h), and raises together where
  // one rank's arguments fail their checks.
  if (group.empty()) {
    stack.checks(lengths, resets);
  } else {
    const std::string error = failed_checks([&] { stack.checks(lengths, resets); });
    stack.shards.emplace(std::string(group), false);
    stack.shards->agree(stack.op,
                        error.empty() ? std::vector<int64_t>{input.size(0), input.size(1), input.size(2),
                                                             state0.size(1), state0.size(2),
                                                             static_cast<int64_t>(input.scalar_type()), num_layers,
                                                             dirs, n, resets.has_value()}
                                      : std::vector<int64_t>{},
                        batch_first ? 1 : 0, input, error);
  }
  // Sizes stay symbolic (SymInt) where nothing needs their value, so that torch.compile and
  // export trace one graph for every T and B. torch.nn's own wording for an empty sequence
  // (a time shard may be empty, the sequence not).
  const c10::SymInt T = input.sym_size(batch_first ? 1 : 0), B = input.sym_size(batch_first ? 0 : 1);
  if (stack.shards) {
    TORCH_CHECK(stack.shards->total() > 0, "Expected sequence length to be larger than 0 in RNN");
  } else {
    TORCH_SYM_CHECK(T.sym_gt(0), "Expected sequence length to be larger than 0 in RNN");
  }
  newton_options(stack.solver);  // checked whichever path runs (torch's fused loop reads none of them)
  stack.requested = parse_method(std::string(method));
  // The reverse direction reads each sequence (each segment) backwards from its own end.
  // (The lengths' values are checked by newton_rnn, which sees them first.)
  if (lengths.has_value()) stack.L = lengths_on(stack.op, *lengths, B, input.device());
  if (resets.has_value()) stack.R = checked_resets(stack.op, *resets, B, T, input.device());
  if (stack.L.defined() || stack.R.defined()) stack.reverse_index = reversed_index(stack.L, stack.R, T);
  if (stack.L.defined()) stack.padding_mask = valid_steps(stack.L, T, input.scalar_type()).transpose(0, 1);  // [T, B, 1]
  return run(stack);
}

// Composite: autograd, torch.compile and export see its parts (newton_rnn, linear, ...).
TORCH_LIBRARY_IMPL(pnewton, CompositeImplicitAutograd, m) { m.impl("rnn_stack", &rnn_stack); }

}  // namespace pnewton
