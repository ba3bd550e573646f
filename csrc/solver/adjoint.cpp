// The adjoint λ_t = g_t + A_{t+1}ᵀ λ_{t+1} at the solution, with the true Jacobian A: by
// one transposed reverse scan of A (scan), by sweeps of the diagonal scan with matrix-free
// Aᵀλ products (iterative), or step by step (sequential); and the built-in cells'
// gradients from it (newton_backward: one VJP of the cell over every step).
#include <cmath>
#include <tuple>

#include "csrc/solver/newton.h"
#include "csrc/solver/segments.h"
#include "csrc/solver/sequence.h"
#include "pnewton/scan.h"

namespace pnewton {
namespace {

// λ by one transposed reverse scan over the true Jacobian A_{t+1} = A[:, 1:] (a view:
// no shifted copy), entering from λ_{T-1} = g_{T-1}. Time shards: the scan sharded over
// A_{t+1} shifted (next_steps).
at::Tensor adjoint_by_scan(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                           const at::Tensor& g, JacobianPart part, const at::Tensor& carried, TimeShards* shards) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2), k = block_width(part, cell);
  at::Tensor J = cell.jacobian(s_prev, gi_flat, part);
  if (carried.defined()) {
    std::vector<int64_t> mask(J.dim(), 1);
    mask[0] = B * T;
    J = J * carried.reshape(mask);
  }
  J = k == 1 ? J.view({B, T, S}) : J.view({B, T, S / k, k, k});
  if (shards) return part_scan(shards, next_steps(J, shards), g, k, std::nullopt, /*reverse=*/true, /*transpose=*/true);
  const at::Tensor head = part_scan(nullptr, J.narrow(1, 1, T - 1), g.narrow(1, 0, T - 1), k, g.select(1, T - 1),
                                    /*reverse=*/true, /*transpose=*/true);
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
  // max |x| of the sweep's step and of λ over the whole sequence: one reduction over the
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
  // Stops on the sweep's step max |λ' − λ|, the error estimate, as the forward solve stops
  // on its Newton step: the residual λ − g − Aᵀλ understates the error by the adjoint
  // recurrence's memory (float32 GRU, hidden 32, T = 256: gradients 5.4× torch.nn's own
  // error with the residual test, the scan adjoint's 1.6× with this one).
  at::Tensor lambda = diag_solve(g);
  const int64_t budget = std::min<int64_t>(shards ? shards->total() : T, 100);
  for (int64_t it = 0; it < budget; ++it) {
    // The off-diagonal part of A_{t+1}ᵀ λ_{t+1} moves to the right-hand side.
    const at::Tensor w = next_transpose_product(lambda);
    const at::Tensor next = diag_solve(g + w - next_steps(diag * lambda, shards));
    const auto [step, scale] = max_abs(next - lambda, next);
    lambda = next;
    if (std::isfinite(step) && step <= tol * (1 + scale)) return lambda;
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
    const JacobianPart structure = cell.structure();
    const bool small_blocks = structure == JacobianPart::diagonal || structure == JacobianPart::block2 ||
                              (structure == JacobianPart::blocks && cell.block_size() <= kBlockNewtonStates);
    adjoint = small_blocks || small_dense ? Adjoint::scan : Adjoint::iterative;
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
