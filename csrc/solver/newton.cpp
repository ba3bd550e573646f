#include "csrc/solver/newton.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "csrc/solver/elk.h"
#include "csrc/solver/segments.h"
#include "csrc/solver/update.h"
#include "pnewton/scan.h"

namespace pnewton {
namespace {

// Adaptive λ (trust region on ½‖r‖²): the step's actual vs predicted decrease ρ. A fixed
// λ is at most kLambdaMax too (beyond it the step is zero in any dtype).
constexpr double kLambdaStart = 1.0, kLambdaMin = 1e-12;
constexpr double kShrink = 0.1, kGrow = 4.0, kAccept = 1e-4;

// [B, T, ...] -> [B·T, ...]: every step of every sequence as one row.
at::Tensor flat(const at::Tensor& x) { return x.flatten(0, 1); }

// Clip a Jacobian approximation: entries (diagonal) or blocks by their Frobenius norm,
// which bounds the spectral norm, so every clipped step is a contraction when clip < 1.
at::Tensor clip_jacobian(const at::Tensor& a, JacobianPart part, double clip) {
  if (part == JacobianPart::diagonal) return a.clamp(-clip, clip);
  const at::Tensor norm = at::linalg_matrix_norm(a, "fro").unsqueeze(-1).unsqueeze(-1);
  return a * at::clamp_max(clip / norm.clamp_min(1e-30), 1.0);
}

// max_s |x_{t,s}| per step of x [B, T, S], NaN propagating: [B, T].
at::Tensor max_abs_per_step(const at::Tensor& x) {
  return x.is_cuda() ? at::linalg_vector_norm(x, INFINITY, at::IntArrayRef{2}) : x.abs().amax(2);
}

// The scans of the solver, over the whole sequence: the sharded scans with time shards.
at::Tensor diag_scan(TimeShards* shards, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& x0 = std::nullopt, bool reverse = false) {
  return shards ? sharded_scan_diag(*shards, a, b, x0, reverse) : scan_diag(a, b, x0, reverse);
}
at::Tensor block_scan(TimeShards* shards, const at::Tensor& A, const at::Tensor& b, bool reverse = false,
                      bool transpose = false) {
  return shards ? sharded_scan_block(*shards, A, b, std::nullopt, reverse, transpose)
                : scan_block(A, b, std::nullopt, reverse, transpose);
}

// −δ for δ solving δ_t = Ã_t δ_{t-1} − r_t, δ_0 = 0, for Ã in the given part: the scan of
// r itself (the recurrence is linear), which saves negating r.
at::Tensor negated_newton_delta(const at::Tensor& a, const at::Tensor& r, JacobianPart part, int64_t D,
                                TimeShards* shards) {
  const int64_t B = r.size(0), T = r.size(1);
  switch (part) {
    case JacobianPart::diagonal: return diag_scan(shards, a, r);
    case JacobianPart::block2: return block_scan(shards, a, r.view({B, T, D, 2})).view({B, T, 2 * D});
    case JacobianPart::dense: return block_scan(shards, a.unsqueeze(2), r.unsqueeze(2)).squeeze(2);
  }
  return r;
}

// The state entering this time shard: the previous shard's last state of s [B, T, S] (one
// gather), s0 for the first shard or in one process.
at::Tensor entering_state(TimeShards* shards, const at::Tensor& s0, const at::Tensor& s) {
  if (shards == nullptr) return at::Tensor();
  return shards->neighbour(s.size(1) > 0 ? s.select(1, -1) : s0, s0, /*earlier=*/true);
}

// The lengths of this time shard's part of each sequence: clamp(L − offset, 0, T).
at::Tensor shard_lengths(const at::Tensor& lengths, int64_t T, TimeShards* shards) {
  return shards ? (lengths - shards->offset()).clamp(0, T) : lengths;
}

// states [B, T, S] held still past each length (hold_past_lengths). Over time shards the
// state held may be an earlier shard's last valid one (one gather of each shard's).
at::Tensor held_states(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& lengths, TimeShards* shards) {
  if (!shards) return hold_past_lengths(states, s0, lengths);
  const int64_t T = states.size(1);
  const at::Tensor local = shard_lengths(lengths, T, shards);
  const at::Tensor last =
      T > 0 ? gather_steps(states, (local - 1).clamp_min(0).unsqueeze(1)).squeeze(1) : at::zeros_like(s0);
  const at::Tensor rows = shards->gather(last);
  at::Tensor held = s0;
  int64_t start = 0;
  for (int64_t q = 0; q < shards->position(); ++q) {
    const int64_t length = shards->length(q);
    const at::Tensor owns = (lengths > start) & (lengths <= start + length);  // step L − 1 is shard q's
    held = at::where(owns.unsqueeze(1), rows[q], held);
    start += length;
  }
  return hold_past_lengths(states, held, local);
}

// [B, T, 1, ...]: a per-step mask broadcast over a Jacobian part of `shape` [B, T, ...].
std::vector<int64_t> jacobian_mask_shape(const std::vector<int64_t>& shape) {
  std::vector<int64_t> mask(shape.size(), 1);
  mask[0] = shape[0], mask[1] = shape[1];
  return mask;
}

JacobianPart method_part(const CellFunction& cell, Method method) {
  switch (method) {
    case Method::deer:
    case Method::elk:
    case Method::elk_filter: return cell.structure();
    case Method::block_deer:
      TORCH_CHECK(cell.has_blocks(), "pnewton: method 'block_deer' needs an lstm, diag_lstm or other cell with 2x2 "
                  "blocks of state pairs");
      return JacobianPart::block2;
    default: return JacobianPart::diagonal;
  }
}

}  // namespace


at::Tensor sequential_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0,
                             const at::Tensor& resets, const at::Tensor& entering) {
  const int64_t T = gi.size(1);
  at::Tensor out = at::empty({gi.size(0), T, s0.size(1)}, s0.options());
  at::Tensor s = entering.defined() ? entering : s0;
  for (int64_t t = 0; t < T; ++t) {
    if (resets.defined() && (t > 0 || entering.defined())) s = at::where(resets.select(1, t).unsqueeze(1), s0, s);
    s = cell.step(s, gi.select(1, t));
    out.select(1, t).copy_(s);
  }
  return out;
}

namespace {

// The loop over time shards: each rank runs its shard from the state the previous one
// handed on (one broadcast per rank, of B·S numbers), in time order.
at::Tensor pipelined_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0,
                            const at::Tensor& resets, TimeShards& shards) {
  at::Tensor enter = s0, states;
  for (int64_t q = 0; q < shards.count(); ++q) {
    at::Tensor last = enter;
    if (q == shards.position()) {
      states = sequential_states(cell, gi, s0, resets, enter);
      if (states.size(1) > 0) last = states.select(1, -1);
    }
    enter = shards.broadcast(last, q);
  }
  return states;
}

// The loop's states over the whole sequence.
at::Tensor loop_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const at::Tensor& resets,
                       TimeShards* shards) {
  return shards ? pipelined_states(cell, gi, s0, resets, *shards) : sequential_states(cell, gi, s0, resets);
}

// Where a solve stands: the states, the cell at them (F = f(s_{t−1}, u_t)), and the
// per-sequence diagnostics. stuck: the sequence cannot converge (its solution is not
// finite, or a trust region stays non-finite), so it takes no more steps.
struct Progress {
  at::Tensor s, F, iterations, residual, converged, path, stuck;
  std::shared_ptr<Workspace> workspace;  // the solve's reused buffers
  // Where the last stage started: its states, F there, and the residual and converged
  // flags of its first test.
  struct Entry {
    at::Tensor s, F, residual, converged;
  } entry;
};

// The auto method's per-stage budget, c·log₂T iterations, and its stall test: a stage
// ends early once no unconverged sequence halved ½‖r‖² in the last kStallWindow
// iterations (the sum, not the maximum: causal methods fix the prefix first).
constexpr int64_t kStallWindow = 4;
int64_t auto_budget(int64_t T) { return std::max<int64_t>(8, 4 * static_cast<int64_t>(std::ceil(std::log2(T + 1.0)))); }

// [B]: the first step whose entry of x [B, T] is true, T where none is.
at::Tensor first_step(const at::Tensor& x) {
  const int64_t T = x.size(1);
  if (T == 0) return at::zeros({x.size(0)}, x.options().dtype(at::kLong));  // an empty time shard
  const at::Tensor t = at::arange(T, x.options().dtype(at::kLong)).unsqueeze(0);
  return at::where(x, t, T).amin(1);
}

// Runs `method` for at most `budget` iterations from p.s; converged sequences keep their
// states. On return p holds the residual at the final states.
void run_stage(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, Method method,
               int64_t budget, bool stop_on_stall, double damping, const NewtonOptions& o, double atol, double rtol,
               const at::Tensor& padding, Progress& p) {
  const int64_t B = s0.size(0), S = s0.size(1), T = gi_flat.size(0) / std::max<int64_t>(B, 1);
  TimeShards* shards = o.shards.get();
  // The whole sequence's length, and where this shard starts in it.
  const int64_t steps_all = shards ? shards->total() : T, offset = shards ? shards->offset() : 0;
  const JacobianPart part = method_part(cell, method);
  const bool newton_like = method != Method::jacobi && method != Method::picard;
  const bool elk = is_elk(method), smooth = method == Method::elk || method == Method::quasi_elk;
  // Every method but ELK makes one more state exact per iteration (δ_t = Ã_t δ_{t−1} − r_t
  // is causal: once δ_{t−1} = 0, δ_t = −r_t makes s_t = f(s_{t−1}, u_t)), whatever Ã is:
  // after T iterations it has the solution, so no budget beyond T can help.
  const bool exact_prefix = !elk;
  if (exact_prefix) budget = std::min(budget, steps_all);
  const bool adaptive = elk && damping == 0;
  at::Tensor lambda = at::full({B}, adaptive ? kLambdaStart : damping, s0.options());
  const std::vector<int64_t> shape = part == JacobianPart::diagonal ? std::vector<int64_t>{B, T, S}
                                     : part == JacobianPart::block2 ? std::vector<int64_t>{B, T, S / 2, 2, 2}
                                                                    : std::vector<int64_t>{B, T, S, S};
  // per step: max_s |r| and the scale max_s |s| (0 on padding), [B, T]
  at::Tensor J, r, r_per_step, scale_per_step;
  at::Tensor& F = p.F;
  // A reset step reads s0: its Jacobian with respect to the previous state is zero.
  const at::Tensor carried = o.resets.defined() ? carried_steps(o.resets, s0.scalar_type()) : at::Tensor();
  // Padding is no part of the system: its residual is zero, it takes no step (a step
  // decaying through it would leave subnormal states, which slow the GEMMs tenfold), and it
  // adds nothing to the scale. Masked, not multiplied: NaN · 0 is NaN.
  auto without_padding = [&](at::Tensor x) { return padding.defined() ? x.masked_fill_(padding, 0) : x; };
  const Cell* builtin = dynamic_cast<const Cell*>(&cell);
  // The cell at states s: F, J in the method's part, the residual r = s − F and the per-step
  // maxima. A built-in cell does all of it in one fused pass after its recurrent GEMM.
  // r_square: Σ_s r² per step [B, T] where the fused pass gives it (the merit's part).
  struct Evaluation {
    at::Tensor F, J, r, r_per_step, scale_per_step, r_square;
  };
  auto evaluate = [&](const at::Tensor& s, bool with_jacobian) {
    const at::Tensor entering = entering_state(shards, s0, s);
    const std::optional<JacobianPart> want = newton_like && with_jacobian ? std::optional<JacobianPart>(part)
                                                                          : std::nullopt;
    if (builtin != nullptr) {
      const at::Tensor rows_padding = padding.defined() ? padding.view({B * T}) : at::Tensor();
      const at::Tensor rows_reset = o.resets.defined() ? o.resets.reshape({B * T}) : at::Tensor();
      if (auto it = builtin->iterate(s, s0, entering, gi_flat, want, rows_padding, rows_reset, p.workspace.get())) {
        return Evaluation{it->F.view({B, T, S}), it->J.defined() ? it->J.view(shape) : it->J, it->R.view({B, T, S}),
                          it->row_residual.view({B, T}), it->row_scale.view({B, T}), it->row_square.view({B, T})};
      }
    }
    const at::Tensor prev = previous_steps(s0, s, o.resets, entering);
    CellFunction::Evaluation e = cell.evaluate(flat(prev), gi_flat, want);
    at::Tensor jacobian = e.J.defined() ? e.J.view(shape) : e.J;
    if (carried.defined() && jacobian.defined()) jacobian = jacobian * carried.view(jacobian_mask_shape(shape));
    const at::Tensor F_s = e.F.view({B, T, S});
    const at::Tensor r_s = without_padding(s - F_s);
    return Evaluation{F_s, jacobian, r_s, max_abs_per_step(r_s),
                      max_abs_per_step(padding.defined() ? s.masked_fill(padding, 0) : s)};
  };
  // Converged: every state finite, and within tolerance of the solution, judged by the
  // error estimate max_t |δ_t| of the step just taken (the residual alone understates the
  // error by the recurrence's memory, 1/(1 − contraction)), relative to the states' own
  // scale max_t |s_t| (f's can be far larger at a diverged iterate); or, for the methods that make one
  // more state exact per iteration, as many iterations in this stage as the sequence has
  // steps; or an exact residual. Once converged, a sequence stays so (its states no longer
  // move). A finite residual s − F means finite states.
  const at::Tensor steps = o.lengths.defined() ? o.lengths : at::full({B}, steps_all, p.iterations.options());
  const at::Tensor iterations_before = p.iterations.clone();
  at::Tensor nonfinite_merit = at::zeros({B}, p.iterations.options());
  auto check = [&](at::Tensor step, const at::Tensor& phi) {
    const at::Tensor& per_step = r_per_step;
    p.residual = max_over_time(per_step);
    at::Tensor scale = step.defined() ? max_over_time(scale_per_step) : at::Tensor();
    // The first step (of the whole sequence) whose residual is not finite; steps_all if none.
    at::Tensor first_bad;
    if (exact_prefix) {
      first_bad = first_step(per_step.isfinite().logical_not());
      first_bad = at::where(first_bad == T, steps_all, first_bad + offset);
    }
    if (shards) {
      // The iteration's one reduction over the ranks: every per-sequence number at once.
      std::vector<at::Tensor> parts{p.residual};
      if (step.defined()) parts.insert(parts.end(), {step.to(r.scalar_type()), scale});
      if (exact_prefix) parts.push_back(-first_bad.to(at::kDouble).to(r.scalar_type()));
      const at::Tensor all = shards->max(at::stack(parts).to(at::kDouble));
      p.residual = all[0].to(r.scalar_type());
      if (step.defined()) step = all[1].to(r.scalar_type()), scale = all[2].to(r.scalar_type());
      if (exact_prefix) first_bad = (-all[parts.size() - 1]).to(at::kLong);
    }
    const at::Tensor finite = p.residual.isfinite();
    at::Tensor done = p.residual == 0;
    if (step.defined()) done = done | (step.isfinite() & (step <= atol + rtol * scale));
    const at::Tensor iterated = p.iterations - iterations_before;
    if (exact_prefix) {
      done = done | (iterated >= steps);
      // A non-finite residual inside the exact prefix is the solution's own: it cannot converge.
      p.stuck = p.stuck | (finite.logical_not() & (first_bad < iterated));
    } else if (phi.defined()) {
      // ELK accepts finite steps only: a merit non-finite for kStallWindow iterations stays so.
      nonfinite_merit = at::where(phi.isfinite(), 0, nonfinite_merit + 1);
      p.stuck = p.stuck | (nonfinite_merit >= kStallWindow);
    }
    if (p.converged.defined()) done = done | p.converged;
    p.converged = finite & done;
  };
  // ½‖x‖² per sequence, from its squares summed per step where the fused pass gave them.
  auto merit = [&](const at::Tensor& x, const at::Tensor& square_per_step = at::Tensor()) {
    at::Tensor m = square_per_step.defined() ? 0.5 * (T > 0 ? square_per_step.sum(1) : at::zeros({B}, x.options()))
                                             : 0.5 * x.square().sum({1, 2});
    if (shards) m = shards->sum(m);
    return at::where(m.isfinite(), m, at::full_like(m, INFINITY));
  };
  // ½‖r‖² per sequence, where something reads it (the stall test, the ELK step).
  const bool track_merit = stop_on_stall || elk;
  at::Tensor phi;
  {
    const Evaluation e = evaluate(p.s, budget > 0);
    F = e.F, J = e.J, r = e.r, r_per_step = e.r_per_step, scale_per_step = e.scale_per_step;
    if (track_merit) phi = merit(r, e.r_square);
  }
  check(at::Tensor(), at::Tensor());
  // Where the stage starts, for method="auto"'s choice between its end and its start.
  p.entry = Progress::Entry{p.s, F, p.residual, p.converged};
  std::vector<at::Tensor> history{phi};
  for (int64_t it = 0; it < budget; ++it) {
    const at::Tensor settled = p.converged | p.stuck;
    if (!o.fixed_iterations) {
      // Tolerance mode: one host synchronisation per iteration. Fixed mode: none.
      at::Tensor stop = settled.all();
      if (stop_on_stall && it >= kStallWindow) {
        const at::Tensor halved = phi <= 0.5 * history[history.size() - 1 - kStallWindow];
        stop = stop | (settled | halved.logical_not()).all();
      }
      if (stop.item<bool>()) break;
    }
    const at::Tensor moving = at::logical_not(settled);
    p.path = p.path | at::where(moving, method_bit(method), 0);
    at::Tensor next, predicted, step;  // step: max_t |δ_t| per sequence
    // Non-finite values beyond the exact prefix are no part of the solution (after iteration
    // i the first i states of a causal method are exact): resetting them (take_step) keeps
    // the ≤ T-iteration guarantee. Non-finite values of the solution itself make the
    // sequence stuck (check), and the states returned for it carry them (nonfinite_pattern).
    if (method == Method::jacobi) {
      next = at::where(moving.view({B, 1, 1}), at::nan_to_num(F, 0.0, 0.0, 0.0), p.s);
      step = p.residual;
    } else if (method == Method::picard) {
      const at::Tensor sum = shards ? diag_scan(shards, at::ones_like(r), r) : r.cumsum(1);
      std::tie(next, step) = take_step(p.s, sum, -1, moving, padding, p.workspace.get());
    } else {
      at::Tensor a = J;
      if (damping > 0 && !elk) a = a * (1.0 - damping);
      if (o.clip > 0) a = clip_jacobian(a, part, o.clip);
      if (elk) {
        const at::Tensor delta = without_padding(elk_delta(a, r, lambda, part, smooth, shards));
        predicted = phi - merit(r + delta - apply_approximation(a, delta, part, shards));
        std::tie(next, step) = take_step(p.s, delta, 1, moving, padding, p.workspace.get());
      } else {
        std::tie(next, step) = take_step(p.s, negated_newton_delta(a, r, part, S / 2, shards), -1, moving, padding,
                                           p.workspace.get());
      }
    }
    const bool more = it + 1 < budget;
    const Evaluation e = evaluate(next, more);
    const at::Tensor &F_new = e.F, &J_new = e.J, &r_new = e.r;
    p.iterations += moving.to(at::kLong);
    if (adaptive) {
      const at::Tensor phi_new = merit(r_new, e.r_square);
      const at::Tensor rho = (phi - phi_new) / predicted.clamp_min(std::numeric_limits<float>::min());
      const at::Tensor accept = moving & phi_new.isfinite() & (rho > kAccept);
      const at::Tensor poor = moving & ((rho < 0.25) | rho.isfinite().logical_not());
      lambda = at::where(moving & (rho > 0.75), lambda * kShrink, at::where(poor, lambda * kGrow, lambda))
                   .clamp(kLambdaMin, kLambdaMax);
      const at::Tensor keep = accept.view({B, 1, 1});
      p.s = at::where(keep, next, p.s);
      F = at::where(keep, F_new, F);
      r = at::where(keep, r_new, r);
      r_per_step = at::where(accept.view({B, 1}), e.r_per_step, r_per_step);
      scale_per_step = at::where(accept.view({B, 1}), e.scale_per_step, scale_per_step);
      if (more) J = at::where(accept.view({B, 1}), J_new.reshape({B, -1}), J.reshape({B, -1})).view(shape);
      phi = at::where(accept, phi_new, phi);
      step = at::where(accept, step, INFINITY);  // a rejected step moved nothing
    } else {
      p.s = next, F = F_new, J = J_new, r = r_new, r_per_step = e.r_per_step, scale_per_step = e.scale_per_step;
      if (track_merit) phi = merit(r, e.r_square);
    }
    check(step, phi);
    history.push_back(phi);
  }
}

// The stages of method="auto": the cheapest method expected to converge, then exact
// Newton where the dense Jacobian is affordable, then the ELK filter step with a fixed
// λ = kAutoLambda, which bounds the step where the linearisation expands (the merit-based
// trust region stalls there: see README "Choosing a method").
constexpr double kAutoLambda = 0.1;
// The dense Jacobian (B·T·S² numbers) is affordable while it stays under this budget,
// the same one the adjoint uses.
constexpr int64_t kDenseBudget = int64_t(1) << 24;
// The largest state size whose dense Jacobian the automatic adjoint scans (solve_adjoint).
constexpr int64_t kDenseScanStates = 8;
std::vector<Method> auto_stages(const CellFunction& cell, int64_t dense_size, bool sharded) {
  std::vector<Method> stages;
  if (cell.structure() != JacobianPart::dense) {
    stages = {Method::deer, Method::elk_filter};
  } else {
    stages = {cell.has_blocks() ? Method::block_deer : Method::quasi_deer};
    if (dense_size <= kDenseBudget) stages.push_back(Method::deer);
    stages.push_back(Method::quasi_elk_filter);
  }
  // Time shards: the ELK stage of the diagonal part only (its step composes across shards).
  if (sharded && cell.structure() == JacobianPart::block2) stages.pop_back();
  return stages;
}

// Where the solution of a sequence is not finite, from the cell evaluated at the returned
// states, F [B, T, S], exact up to the first non-finite step t0 of a stuck sequence: the
// entries that are non-finite there, and everything the recurrence carries them to after
// t0 — the same state entry (diagonal cells), the (h, c) pair (2×2 blocks) or every entry
// (dense) — up to the next reset. This is the NaN pattern of the loop (torch.nn's) for NaN
// inputs, without running the loop.
at::Tensor nonfinite_pattern(const at::Tensor& F, JacobianPart structure, const at::Tensor& resets,
                             const at::Tensor& padding, TimeShards* shards) {
  const int64_t B = F.size(0), T = F.size(1), S = F.size(2);
  at::Tensor bad = F.isfinite().logical_not();
  if (padding.defined()) bad.masked_fill_(padding, false);
  at::Tensor spread = bad;
  if (structure == JacobianPart::block2) spread = bad.view({B, T, S / 2, 2}).any(-1, true).expand({B, T, S / 2, 2});
  if (structure == JacobianPart::dense) spread = bad.any(-1, true);
  spread = spread.reshape({B, T, structure == JacobianPart::dense ? 1 : S});
  // Global step indices (time shards: this shard's offset added); -1: none.
  const int64_t offset = shards ? shards->offset() : 0;
  const at::Tensor t = at::arange(offset, offset + T, F.options().dtype(at::kLong)).view({1, T, 1});
  // The last bad step up to t, and the start of t's segment (the latest reset; 0 before any).
  at::Tensor last = std::get<0>(at::where(spread, t, -1).cummax(1));
  at::Tensor start = resets.defined() ? std::get<0>(at::where(resets, t.squeeze(-1), -1).cummax(1)).unsqueeze(-1)
                                      : at::full({B, T, 1}, -1, t.options());
  // Time shards: what the earlier shards carry in (their last bad step, their latest reset:
  // one gather, the rare stuck case only).
  at::Tensor last_in = at::full({B, last.size(2)}, -1, t.options()), start_in = at::full({B, 1}, -1, t.options());
  if (shards) {
    const at::Tensor ends = at::cat({T > 0 ? last.select(1, T - 1) : last_in, T > 0 ? start.select(1, T - 1) : start_in}, 1);
    const at::Tensor rows = shards->gather(ends);
    for (int64_t q = 0; q < shards->position(); ++q) {
      last_in = at::maximum(last_in, rows[q].narrow(1, 0, last_in.size(1)));
      start_in = at::maximum(start_in, rows[q].narrow(1, last_in.size(1), 1));
    }
  }
  last = at::maximum(last, last_in.unsqueeze(1));
  start = at::maximum(at::maximum(start, start_in.unsqueeze(1)), at::zeros({1}, t.options()));
  const at::Tensor last_before =
      T > 0 ? at::cat({last_in.unsqueeze(1), last.narrow(1, 0, T - 1)}, 1) : last;
  return bad | (last_before >= start);
}

}  // namespace

NewtonResult newton_solve(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const NewtonOptions& o) {
  const int64_t B = gi.size(0), T = gi.size(1), S = s0.size(1);
  TimeShards* shards = o.shards.get();
  const int64_t steps_all = shards ? shards->total() : T;  // the whole sequence's length
  // (Over time shards the ELK step has the diagonal part only: the op checked the method.)
  const auto opts = s0.options();
  const double atol = o.atol < 0 ? default_tolerance(s0.scalar_type()) : o.atol;
  const double rtol = o.rtol < 0 ? default_tolerance(s0.scalar_type()) : o.rtol;
  NewtonResult res;
  res.iterations = at::zeros({B}, opts.dtype(at::kLong));
  res.path = at::zeros({B}, opts.dtype(at::kLong));
  const at::Tensor& lengths = o.lengths;
  // The loop's states are the solution by definition, unless they are not finite: then the
  // sequence is not converged and its residual is NaN (as the residual of NaN states is).
  auto exact = [&](const at::Tensor& states, at::Tensor& converged, at::Tensor& residual) {
    converged = states.isfinite().flatten(1).all(1);
    if (shards) converged = shards->max(converged.logical_not().to(at::kFloat)) == 0;
    residual = at::where(converged, 0.0, NAN).to(opts.dtype());
  };
  if (steps_all == 0 || B == 0 || S == 0 || o.method == Method::sequential) {
    res.states = loop_states(cell, gi, s0, o.resets, shards);
    if (lengths.defined()) res.states = held_states(res.states, s0, lengths, shards);
    if (lengths.defined()) res.iterations.copy_(lengths); else res.iterations.fill_(steps_all);
    exact(res.states, res.converged, res.residual);
    if (steps_all > 0) res.path.fill_(method_bit(Method::sequential));
    return res;
  }
  const at::Tensor gi_flat = flat(gi);
  at::Tensor s;
  if (o.init == "zeros") {
    s = at::zeros({B, T, S}, opts);
  } else if (o.init == "one_step") {
    s = cell.step(s0.unsqueeze(1).expand({B, T, S}).reshape({B * T, S}), gi_flat).view({B, T, S});
  } else {  // "states" (newton_options checked init; the op checked init_states)
    TORCH_CHECK(o.init_states.defined(), "pnewton: init='states' needs init_states");
    s = o.init_states.to(opts).clone();
  }

  const at::Tensor padding =
      lengths.defined() ? valid_steps(shard_lengths(lengths, T, shards), T, at::kBool).logical_not() : at::Tensor();
  Progress p{s, at::Tensor(), res.iterations, at::Tensor(), at::Tensor(), res.path,
             at::zeros({B}, opts.dtype(at::kBool)), std::make_shared<Workspace>()};
  if (o.method != Method::automatic) {
    run_stage(cell, gi_flat, s0, o.method, o.max_iter < 0 ? std::min<int64_t>(steps_all, 100) : o.max_iter, false,
              o.damping,
              o, atol, rtol, padding, p);
  } else if (o.fixed_iterations) {
    // No host synchronisation: the first stage only, for exactly max_iter iterations.
    const Method first = auto_stages(cell, B * steps_all * S * S, shards != nullptr).front();
    run_stage(cell, gi_flat, s0, first, o.max_iter, false, o.damping, o, atol, rtol, padding, p);
  } else {
    int64_t left = o.max_iter < 0 ? std::numeric_limits<int64_t>::max() : o.max_iter;
    for (const Method m : auto_stages(cell, B * steps_all * S * S, shards != nullptr)) {
      const int64_t budget = std::min(auto_budget(steps_all), left);
      const at::Tensor before = p.iterations.max();
      run_stage(cell, gi_flat, s0, m, budget, true, is_elk(m) ? kAutoLambda : o.damping, o, atol, rtol, padding, p);
      // A stage that left an unconverged sequence worse than it found it hands the next stage
      // its start (read once: the states are moved only when one did). A converged one stays:
      // its step passed the stop test, and at the rounding floor a confirming step may move
      // the residual up by an ulp.
      const Progress::Entry& start = p.entry;
      const at::Tensor worse = p.stuck.logical_not() & p.converged.logical_not() &
                               ((p.residual > start.residual) | p.residual.isfinite().logical_not());
      if (worse.any().item<bool>()) {
        p.s = at::where(worse.view({B, 1, 1}), start.s, p.s);
        p.F = at::where(worse.view({B, 1, 1}), start.F, p.F);
        p.residual = at::where(worse, start.residual, p.residual);
        p.converged = at::where(worse, start.converged, p.converged);
      }
      left -= (p.iterations.max() - before).item<int64_t>();
      if (left <= 0 || (p.converged | p.stuck).all().item<bool>()) break;
    }
  }
  res.iterations = p.iterations;
  res.residual = p.residual;
  res.converged = p.converged;
  res.path = p.path;
  // Whether every sequence converged and whether one is stuck: one host read (fixed mode
  // reads nothing, and takes both as possible).
  bool all_converged = false, any_stuck = true;
  if (!o.fixed_iterations) {
    const at::Tensor flags = at::stack({res.converged.all(), p.stuck.any()}).cpu();
    all_converged = flags[0].item<bool>(), any_stuck = flags[1].item<bool>();
  }
  if (o.fallback && !o.fixed_iterations && !all_converged) {
    res.states = lengths.defined() ? held_states(p.s, s0, lengths, shards) : p.s;
    const at::Tensor redo = at::logical_not(res.converged).nonzero().squeeze(1);
    const at::Tensor s0_redo = s0.index_select(0, redo);
    at::Tensor states = loop_states(cell, gi.index_select(0, redo), s0_redo,
                                    o.resets.defined() ? o.resets.index_select(0, redo) : at::Tensor(), shards);
    if (lengths.defined()) states = held_states(states, s0_redo, lengths.index_select(0, redo), shards);
    res.states.index_copy_(0, redo, states);
    if (lengths.defined()) res.iterations.index_copy_(0, redo, lengths.index_select(0, redo));
    else res.iterations.index_fill_(0, redo, steps_all);
    at::Tensor converged, residual;
    exact(states, converged, residual);
    res.converged.index_copy_(0, redo, converged);
    res.residual.index_copy_(0, redo, residual);
    res.path.index_copy_(0, redo, res.path.index_select(0, redo) | method_bit(Method::sequential));
    return res;
  }
  // No fallback: a stuck sequence returns its exact prefix and its solution's non-finite
  // pattern (the states the iteration reset to finite values are no part of the answer).
  // (Fixed mode computes it unconditionally: it reads nothing back to the host.)
  at::Tensor states = p.s;
  if (any_stuck) {
    const at::Tensor pattern =
        nonfinite_pattern(p.F, cell.structure(), o.resets, padding, shards) & p.stuck.view({B, 1, 1});
    states = states.masked_fill(pattern, NAN);
  }
  res.states = lengths.defined() ? held_states(states, s0, lengths, shards) : states;
  return res;
}

namespace {

// x_{t+1} for every step of x [B, T, ...], zero after the sequence's end (time shards: the
// next shard's first step after this shard's last).
at::Tensor next_steps(const at::Tensor& x, TimeShards* shards) { return shift_in_time(x, true, 0.0, shards); }

// λ by one transposed reverse scan over the true Jacobian A_{t+1} = A[:, 1:] (a view:
// no shifted copy), entering from λ_{T-1} = g_{T-1}. Time shards: the scan sharded over
// A_{t+1} shifted (next_steps).
at::Tensor adjoint_by_scan(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                           const at::Tensor& g, JacobianPart part, const at::Tensor& carried, TimeShards* shards) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2), D = S / 2;
  at::Tensor head;
  at::Tensor J = cell.jacobian(s_prev, gi_flat, part);
  if (carried.defined()) {
    std::vector<int64_t> mask(J.dim(), 1);
    mask[0] = B * T;
    J = J * carried.reshape(mask);
  }
  if (shards) {
    const at::Tensor A = next_steps(part == JacobianPart::diagonal ? J.view({B, T, S})
                                    : part == JacobianPart::block2 ? J.view({B, T, D, 2, 2})
                                                                   : J.view({B, T, 1, S, S}),
                                    shards);
    if (part == JacobianPart::diagonal) return diag_scan(shards, A, g, std::nullopt, /*reverse=*/true);
    if (part == JacobianPart::block2) {
      return block_scan(shards, A, g.view({B, T, D, 2}), true, /*transpose=*/true).view({B, T, S});
    }
    return block_scan(shards, A, g.unsqueeze(2), true, true).squeeze(2);
  }
  const at::Tensor g_head = g.narrow(1, 0, T - 1), g_last = g.select(1, T - 1);
  if (part == JacobianPart::diagonal) {
    head = scan_diag(J.view({B, T, S}).narrow(1, 1, T - 1), g_head, g_last, /*reverse=*/true);
  } else if (part == JacobianPart::block2) {
    head = scan_block(J.view({B, T, D, 2, 2}).narrow(1, 1, T - 1), g_head.reshape({B, T - 1, D, 2}),
                      g_last.reshape({B, D, 2}), true, /*transpose=*/true)
               .view({B, T - 1, S});
  } else {
    head = scan_block(J.view({B, T, 1, S, S}).narrow(1, 1, T - 1), g_head.unsqueeze(2), g_last.unsqueeze(1), true,
                      true)
               .squeeze(2);
  }
  return at::cat({head, g.narrow(1, T - 1, 1)}, 1);
}

// w_t = A_{t+1}ᵀ λ_{t+1} (zero at the last step), matrix-free through the cell's VJP.
at::Tensor next_step_transpose_product(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                                       const at::Tensor& lambda, const at::Tensor& carried, TimeShards* shards) {
  const int64_t B = lambda.size(0), T = lambda.size(1), S = lambda.size(2);
  at::Tensor u = cell.transpose_product(s_prev, gi_flat, flat(lambda)).view({B, T, S});
  if (carried.defined()) u = u * carried;
  return next_steps(u, shards);
}

// The reverse sweep of one shard, entered by `carry` = A_{t+1}ᵀ λ_{t+1} from the step after
// it (zero at the sequence's end); returns λ and, if hand_on, what it hands to the step before.
std::tuple<at::Tensor, at::Tensor> reverse_sweep(const CellFunction& cell, const at::Tensor& s_prev,
                                                 const at::Tensor& gi_flat, const at::Tensor& g,
                                                 const at::Tensor& carried, at::Tensor carry, bool hand_on) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2);
  const at::Tensor sp = s_prev.view({B, T, S}), gv = gi_flat.unflatten(0, {B, T});
  at::Tensor lambda = at::empty_like(g);
  for (int64_t t = T - 1; t >= 0; --t) {
    const at::Tensor l = g.select(1, t) + carry;
    lambda.select(1, t).copy_(l);
    if (t == 0 && !hand_on) break;
    carry = cell.transpose_product(sp.select(1, t), gv.select(1, t), l);
    if (carried.defined()) carry = carry * carried.select(1, t);
  }
  return {lambda, carry};
}

// The sequential adjoint; over time shards a pipeline from the last shard to the first
// (one broadcast of B·S numbers per shard).
at::Tensor adjoint_sequential(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                              const at::Tensor& g, const at::Tensor& carried, TimeShards* shards) {
  at::Tensor carry = at::zeros({g.size(0), g.size(2)}, g.options());
  if (!shards) return std::get<0>(reverse_sweep(cell, s_prev, gi_flat, g, carried, carry, false));
  at::Tensor lambda;
  for (int64_t q = shards->count() - 1; q >= 0; --q) {
    at::Tensor out = carry;
    if (q == shards->position()) std::tie(lambda, out) = reverse_sweep(cell, s_prev, gi_flat, g, carried, carry, true);
    carry = shards->broadcast(out, q);
  }
  return lambda;
}

// λ without forming A: a splitting iteration whose inner solve is the diagonal reverse
// scan. Like any undamped scheme it makes the last i adjoints exact after i sweeps.
at::Tensor adjoint_iterative(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                             const at::Tensor& g, const at::Tensor& carried, TimeShards* shards) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2);
  const double tol = default_tolerance(g.scalar_type());
  at::Tensor diag = cell.jacobian(s_prev, gi_flat, JacobianPart::diagonal).view({B, T, S});
  if (carried.defined()) diag = diag * carried;
  const at::Tensor diag_next = shards ? next_steps(diag, shards) : at::Tensor();
  auto diag_solve = [&](const at::Tensor& rhs) {
    if (shards) return diag_scan(shards, diag_next, rhs, std::nullopt, /*reverse=*/true);
    const at::Tensor head = scan_diag(diag.narrow(1, 1, T - 1), rhs.narrow(1, 0, T - 1), rhs.select(1, T - 1), true);
    return at::cat({head, rhs.narrow(1, T - 1, 1)}, 1);
  };
  // max |x| of the sweep's residual and of λ over the whole sequence: one reduction over the
  // shards and one host read per sweep.
  auto max_abs = [&](const at::Tensor& residual, const at::Tensor& l) {
    at::Tensor m = residual.numel() ? at::stack({residual.abs().max(), l.abs().max()}) : at::zeros({2}, l.options());
    if (shards) m = shards->max(m);
    const auto both = m.to(at::kDouble).cpu();
    return std::make_pair(both[0].item<double>(), both[1].item<double>());
  };
  // A built-in cell's Jacobian, linearised once: each sweep's Aᵀλ is then one GEMM.
  const Cell* builtin = dynamic_cast<const Cell*>(&cell);
  const std::optional<Cell::Linearisation> linear =
      builtin ? builtin->linearise(s_prev, gi_flat, carried.defined() ? flat(carried) : carried) : std::nullopt;
  auto next_transpose_product = [&](const at::Tensor& l) {
    if (!linear) return next_step_transpose_product(cell, s_prev, gi_flat, l, carried, shards);
    return next_steps(builtin->transpose_product(*linear, flat(l)).view({B, T, S}), shards);
  };
  at::Tensor lambda = diag_solve(g);
  const int64_t budget = std::min<int64_t>(shards ? shards->total() : T, 100);
  for (int64_t it = 0; it < budget; ++it) {
    const at::Tensor w = next_transpose_product(lambda);
    const auto [err, scale] = max_abs(lambda - g - w, lambda);
    if (std::isfinite(err) && err <= tol * (1 + scale)) return lambda;
    // The off-diagonal part of A_{t+1}ᵀ λ_{t+1} moves to the right-hand side.
    const at::Tensor dl = diag * lambda;
    lambda = diag_solve(g + w - next_steps(dl, shards));
  }
  return adjoint_sequential(cell, s_prev, gi_flat, g, carried, shards);
}

}  // namespace

at::Tensor solve_adjoint(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& u_flat,
                         const at::Tensor& g, Adjoint adjoint, const at::Tensor& carried, TimeShards* shards) {
  const int64_t B = g.size(0), S = g.size(2);
  if (adjoint == Adjoint::automatic) {
    // The dense Jacobian costs B·T·S² numbers (per shard: the longest one decides, alike on
    // every rank) and its scan B·T·S³ operations against the iterative adjoint's few sweeps
    // of one GEMM each: form it only while both stay small. GRU, B = 1, T = 4096, 1 CPU
    // thread, forward+backward (benchmarks/bench_layers.py --adjoint): equal at S = 4 and
    // 8, the iterative adjoint 1.5×, 2.9× and 5.8× faster at S = 16, 32 and 64.
    int64_t T = g.size(1);
    if (shards) {
      for (int64_t q = 0; q < shards->count(); ++q) T = std::max(T, shards->length(q));
    }
    const bool small_dense = B * T * S * S <= kDenseBudget && S <= kDenseScanStates;
    adjoint = cell.structure() != JacobianPart::dense || small_dense ? Adjoint::scan : Adjoint::iterative;
  }
  switch (adjoint) {
    case Adjoint::scan: return adjoint_by_scan(cell, s_prev, u_flat, g, cell.structure(), carried, shards);
    case Adjoint::iterative: return adjoint_iterative(cell, s_prev, u_flat, g, carried, shards);
    default: return adjoint_sequential(cell, s_prev, u_flat, g, carried, shards);
  }
}

at::Tensor previous_states(const at::Tensor& s0, const at::Tensor& states, const at::Tensor& resets) {
  return flat(previous_steps(s0, states, resets));
}

NewtonGrads newton_backward(const Cell& cell, const at::Tensor& grad_states, const at::Tensor& gi,
                            const at::Tensor& s0, const at::Tensor& states, Adjoint adjoint,
                            const at::Tensor& lengths, const at::Tensor& resets, TimeShards* shards) {
  const int64_t B = gi.size(0), T = gi.size(1), S = s0.size(1);
  NewtonGrads grads;
  if ((shards ? shards->total() : T) == 0 || B == 0) {
    grads.gi = at::zeros_like(gi);
    grads.W_hh = at::zeros_like(cell.weight());
    grads.b_hh = at::zeros({cell.gate_size()}, gi.options());
    grads.s0 = at::zeros_like(s0);
    if (cell.is_projected()) grads.W_hr = at::zeros_like(cell.projection());
    return grads;
  }
  const at::Tensor s_prev = flat(previous_steps(s0, states, resets, entering_state(shards, s0, states)));
  const at::Tensor gi_flat = flat(gi);
  const at::Tensor carried = resets.defined() ? carried_steps(resets, s0.scalar_type()) : at::Tensor();
  // Held states copy the last valid one: their cotangents belong to it (padding's own
  // cotangents are then zero, and so is its adjoint: λ_t = 0 for t ≥ L).
  at::Tensor g = grad_states, g_s0_held;
  if (lengths.defined()) {
    std::tie(g, g_s0_held) = route_held_gradient(grad_states, shard_lengths(lengths, T, shards));
    if (shards) {
      // What this shard's held steps copied came from s0 (L = 0) or from step L − 1 of the
      // shard that holds it, which takes every shard's part (one all-reduce).
      const int64_t offset = shards->offset();
      const at::Tensor total = shards->sum(g_s0_held);
      const at::Tensor owns = (lengths > offset) & (lengths <= offset + T);
      if (T > 0) {
        const at::Tensor step = (lengths - 1 - offset).clamp(0, T - 1).view({B, 1, 1}).expand({B, 1, S});
        g = g.scatter_add(1, step, at::where(owns.unsqueeze(1), total, 0).unsqueeze(1));
      }
      g_s0_held = at::where((lengths == 0).unsqueeze(1), g_s0_held, 0);
    }
  }
  const at::Tensor lambda = solve_adjoint(cell, s_prev, gi_flat, g.contiguous(), adjoint, carried, shards);
  // Everything else is parallel over t: one VJP of the cell at the solution.
  const Cell::Vjp v = cell.vjp(s_prev, gi_flat, flat(lambda));
  grads.gi = v.gi.view({B, T, gi.size(2)});
  grads.W_hh = cell.weight_grad(v.gh, cell.hidden_of(s_prev));
  grads.b_hh = v.gh.sum(0);
  grads.W_hr = v.W_hr;
  // s0 is read by step 0 and by every reset step. (A later time shard's step 0 reads the
  // previous shard's last state, whose cotangent λ already carries.)
  const at::Tensor v_s = v.s.view({B, T, S});
  const bool starts = !shards || (T > 0 && shards->offset() == 0);
  if (resets.defined()) {
    at::Tensor reads = at::rsub(carried, 1);
    if (starts) reads.select(1, 0).fill_(1);
    grads.s0 = (v_s * reads).sum(1);
  } else {
    grads.s0 = starts ? v_s.select(1, 0) : at::zeros_like(s0);
  }
  if (g_s0_held.defined()) grads.s0 = grads.s0 + g_s0_held;
  return grads;
}

}  // namespace pnewton
