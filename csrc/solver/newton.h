#pragma once
// The parallel Newton solver for the built-in cells (DESIGN §1), over ATen ops: each
// iteration evaluates the cell at every step at once (one recurrent GEMM), forms the
// method's Jacobian approximation and solves δ_t = Ã_t δ_{t-1} − r_t with the scan ops.
// The backward is the adjoint λ_t = g_t + A_{t+1}ᵀ λ_{t+1} with the true Jacobian A.
#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include "csrc/distributed/time_shards.h"
#include "csrc/solver/cells.h"
#include "pnewton/solver.h"

namespace pnewton {

// The order is the bit order of NewtonResult::path (torch_ops/solve.py mirrors it).
// fused_loop: torch's own fused RNN kernels over a layer stack (csrc/solver/fused_loop.h), a
// path of rnn_stack only (auto's choice, or method "sequential" there).
enum class Method {
  deer, quasi_deer, block_deer, picard, jacobi, sequential, elk, quasi_elk, elk_filter, quasi_elk_filter,
  fused_loop, automatic
};
Method parse_method(const std::string& name);
inline int64_t method_bit(Method m) { return int64_t(1) << static_cast<int>(m); }
inline bool is_elk(Method m) {
  return m == Method::elk || m == Method::quasi_elk || m == Method::elk_filter || m == Method::quasi_elk_filter;
}
// The largest ELK λ (beyond it the step is zero in any dtype): adaptive and fixed alike.
constexpr double kLambdaMax = 1e12;
// The dense Jacobian (B·T·S² numbers) is affordable while it stays under this budget
// (auto's exact-Newton stage, the automatic adjoint).
constexpr int64_t kDenseBudget = int64_t(1) << 24;
// auto runs exact Newton first on a cell whose Jacobian is k×k blocks with k up to this
// (a block scan's k³ combine stays cheap beside the cell's own evaluation).
constexpr int64_t kBlockNewtonStates = 16;
// The largest state size whose dense Jacobian the automatic adjoint scans (solve_adjoint).
constexpr int64_t kDenseScanStates = 8;
// auto's stall test: a stage ends once no unconverged sequence halved ½‖r‖² in the last
// kStallWindow iterations (the sum, not the maximum: causal methods fix the prefix first);
// ELK's: a merit non-finite this long stays so.
constexpr int64_t kStallWindow = 4;

struct NewtonOptions {
  Method method = Method::quasi_deer;
  int64_t max_iter = -1;  // -1: min(T, 100)
  double atol = -1, rtol = -1;  // -1: the dtype's default (default_tolerance)
  double damping = 0;     // κ: Ã ← (1 − κ) Ã. elk methods: λ > 0 fixed, 0 = adaptive (trust region)
  double clip = 0;        // > 0: |Ã| entries (or block Frobenius norms) clipped to ≤ clip
  std::string init = "zeros";  // zeros | one_step | states
  at::Tensor init_states;      // [B, T, S] when init == "states"
  bool fixed_iterations = false;  // exactly max_iter iterations, no host synchronisation
  bool fallback = true;           // rerun unconverged sequences sequentially
  at::Tensor lengths;             // [B] int64 on the states' device, or undefined (all T steps)
  at::Tensor resets;              // [B, T] bool: segment heads that read s0 (csrc/solver/segments.h)
  // Sequence parallelism: gi, init_states, resets and the states are this rank's time shard
  // (csrc/distributed/time_shards.h), agreed on by every rank; null: one process. The solver
  // is the same: the cell reads the state entering the shard from the previous one, the
  // Newton step is the sharded scan, and every per-sequence decision is reduced over the
  // ranks, so that all of them take the same iterations.
  SharedShards shards;
};

struct NewtonResult {
  at::Tensor states;      // [B, T, S]
  at::Tensor iterations;  // [B] int64
  at::Tensor residual;    // [B] final max_t |s_t − f(s_{t−1}, u_t)|
  at::Tensor converged;   // [B] bool
  at::Tensor path;        // [B] int64: method_bit of every method that moved this sequence
};

// The public options from an op's arguments, and checked and parsed for the solver.
SolverOptions solver_options(c10::string_view method, int64_t max_iter, double atol, double rtol, double damping,
                             double clip, c10::string_view init, bool fixed_iterations, bool fallback,
                             c10::string_view adjoint);
NewtonOptions newton_options(const SolverOptions& options);

// Residual tolerance (atol = rtol) used when the caller passes a negative one.
double default_tolerance(at::ScalarType dtype);

// gi [B, T, G] input projections, s0 [B, S]. Float32/float64 (callers widen fp16/bf16).
// Any CellFunction: gi are then its inputs [B, T, ...].
NewtonResult newton_solve(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0,
                          const NewtonOptions& options);

// The states by the step-by-step loop.
// entering: the state entering a time shard (then step 0 reads it unless it is a reset).
at::Tensor sequential_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0,
                             const at::Tensor& resets = {}, const at::Tensor& entering = {});

enum class Adjoint { automatic, scan, iterative, sequential };
Adjoint parse_adjoint(const std::string& name);

struct NewtonGrads {
  at::Tensor gi, W_hh, b_hh, s0, W_hr;  // W_hr: lstm_proj only
};

// Exact gradients at the solution `states` for the cotangent grad_states.
// scan: forms the true Jacobian (diagonal, 2×2 blocks or dense: O(T·S²) memory) and runs
// one transposed reverse scan. iterative: never forms it; λ is iterated with the diagonal
// scan as preconditioner and matrix-free Aᵀλ products, to tolerance, then falls back to
// the sequential reverse sweep. automatic: scan for structured cells or while S ≤ 8 and B·T·S² ≤ 2^24.
// λ_t = g_t + A_{t+1}ᵀ λ_{t+1} for the true Jacobian A_t = ∂f/∂s at (s_prev_t, u_t):
// s_prev and u_flat are flattened [B·T, ...] rows, g is [B, T, S].
// carried [B, T, 1] (or undefined): 0 where a reset step's Jacobian is zero.
// shards: the sharded adjoint scan over this rank's time shard (adjoint is then always scan).
at::Tensor solve_adjoint(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& u_flat,
                         const at::Tensor& g, Adjoint adjoint, const at::Tensor& carried = {},
                         TimeShards* shards = nullptr);
// [s0, s_1, ..., s_{T-1}] flattened to [B·T, S]: the state each step reads (s0 at resets).
at::Tensor previous_states(const at::Tensor& s0, const at::Tensor& states, const at::Tensor& resets = {});

// lengths, resets: as NewtonOptions' (states then hold past each length).
// shards: as NewtonOptions' (the adjoint is then the sharded reverse scan; W_hh, b_hh, s0,
// W_hr get this shard's part of their gradient).
NewtonGrads newton_backward(const Cell& cell, const at::Tensor& grad_states, const at::Tensor& gi,
                            const at::Tensor& s0, const at::Tensor& states, Adjoint adjoint,
                            const at::Tensor& lengths = {}, const at::Tensor& resets = {},
                            TimeShards* shards = nullptr);

// The kernel of newton_rnn_backward (csrc/solver/newton_kernel.cpp): checks, widening,
// newton_backward. Written over differentiable ATen and scan ops, so with grad mode on its
// result carries a graph (the op's double backward, csrc/autograd/newton_autograd.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> newton_rnn_backward_kernel(
    const at::Tensor& grad_states, c10::string_view cell, const at::Tensor& gi, const at::Tensor& W_hh,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& s0, const at::Tensor& states, c10::string_view adjoint,
    const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& W_hr,
    const c10::optional<at::Tensor>& resets, c10::string_view group, bool reversed_ranks);

// The time shards of `group` ("": null), after every rank agreed on the call's sizes,
// options (read only where this rank's checks passed) and lengths (TimeShards::agree): the
// solver ops' one entry to sequence parallelism. local_error: what this rank's argument
// checks raised (failed_checks): then every rank raises it.
SharedShards solver_shards(const char* op, c10::string_view group, bool reversed_ranks, const at::Tensor& gi,
                           const at::Tensor& s0, const std::string& local_error,
                           const std::function<std::vector<int64_t>()>& options,
                           const c10::optional<at::Tensor>& lengths);

}  // namespace pnewton
