#pragma once
// Public C++ API of the Newton solver for the built-in cells (torch.ops.pnewton.newton_rnn).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace pnewton {

// The solver options; negative max_iter / atol / rtol select the per-dtype defaults
// (min(T, 100) iterations; 1e-12 for float64, 3e-7 otherwise, on the Newton step, the
// error estimate). See README "The solver".
struct SolverOptions {
  std::string method = "auto";  // auto | deer | quasi_deer | block_deer | elk | quasi_elk | elk_filter |
                               // quasi_elk_filter | picard | jacobi | sequential
  int64_t max_iter = -1;
  double atol = -1.0, rtol = -1.0;
  double damping = 0.0, clip = 0.0;  // damping: κ in [0, 1); for the elk methods λ (0 = adaptive)
  std::string init = "zeros";  // zeros | one_step | states (with init_states)
  bool fixed_iterations = false;
  bool fallback = true;
  std::string adjoint = "auto";  // auto | scan | iterative | sequential
  // Sequence parallelism (README "Long sequences across devices"): the name of a registered
  // torch.distributed process group whose ranks hold consecutive time shards of the batch,
  // this rank's in the call; "" is one process. reversed_ranks: rank P−1 holds the start.
  std::string group;
  bool reversed_ranks = false;
};

// Per-sequence diagnostics of one solve ([B] each).
struct SolveStats {
  at::Tensor iterations, residual, converged;
  // int64 bits of the methods that moved each sequence, in the order deer, quasi_deer,
  // block_deer, picard, jacobi, sequential, elk, quasi_elk, elk_filter, quasi_elk_filter,
  // fused_loop (torch's own fused RNN kernels over a layer stack: the modules' auto where
  // the parallel solve does not pay, or method "sequential" there).
  at::Tensor path;
  // Whether the solver's sequential loop produced each sequence (its fallback, or method
  // "sequential" in newton_rnn).
  at::Tensor sequential() const { return (path & (int64_t(1) << 5)) != 0; }
  // Diagnostics stacked over solves [n, B] (e.g. a stack's layers) -> the worst per sequence.
  static SolveStats worst(const at::Tensor& iterations, const at::Tensor& residual, const at::Tensor& converged,
                          const at::Tensor& path) {
    at::Tensor bits = path.select(0, 0);
    for (int64_t i = 1; i < path.size(0); ++i) bits = bits | path.select(0, i);
    return {iterations.amax(0), residual.amax(0), converged.all(0), bits};
  }
};

// Solves a built-in cell ("gru", "lstm", "rnn_tanh", "rnn_relu", "diag_gru", "diag_lstm")
// over gi [B, T, G] from s0 [B, S]; returns the states [B, T, S] and the diagnostics.
// lengths [B]: per-sequence lengths in a padded batch (states hold still past them).
// W_hr: the projection of cell "lstm_proj" (torch.nn.LSTM's proj_size; state [h | c]).
// resets [B, T] (bool): segments packed end to end, each true step starting from s0 again.
inline std::tuple<at::Tensor, SolveStats> newton_rnn(const std::string& cell, const at::Tensor& gi,
                                                     const at::Tensor& W_hh, const std::optional<at::Tensor>& b_hh,
                                                     const at::Tensor& s0, const SolverOptions& o = {},
                                                     const std::optional<at::Tensor>& init_states = std::nullopt,
                                                     const std::optional<at::Tensor>& lengths = std::nullopt,
                                                     const std::optional<at::Tensor>& W_hr = std::nullopt,
                                                     const std::optional<at::Tensor>& resets = std::nullopt) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      c10::string_view, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      c10::string_view, int64_t, double, double, double, double, c10::string_view, const std::optional<at::Tensor>&,
      bool, bool, c10::string_view, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, c10::string_view, bool);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pnewton::newton_rnn", "").typed<Sig>();
  auto [states, iterations, residual, converged, path] =
      op.call(cell, gi, W_hh, b_hh, s0, o.method, o.max_iter, o.atol, o.rtol, o.damping, o.clip, o.init, init_states,
              o.fixed_iterations, o.fallback, o.adjoint, lengths, W_hr, resets, o.group, o.reversed_ranks);
  return {states, SolveStats{iterations, residual, converged, path}};
}

}  // namespace pnewton
