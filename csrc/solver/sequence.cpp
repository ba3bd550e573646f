#include "csrc/solver/sequence.h"

#include "csrc/solver/cells.h"
#include "csrc/solver/newton.h"
#include "csrc/solver/segments.h"
#include "pnewton/scan.h"

namespace pnewton {

// The scans of the solver, over the whole sequence: the sharded scans with time shards.
at::Tensor diag_scan(TimeShards* shards, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& x0, bool reverse) {
  return shards ? sharded_scan_diag(*shards, a, b, x0, reverse) : scan_diag(a, b, x0, reverse);
}
at::Tensor block_scan(TimeShards* shards, const at::Tensor& A, const at::Tensor& b, bool reverse,
                      bool transpose) {
  return shards ? sharded_scan_block(*shards, A, b, std::nullopt, reverse, transpose)
                : scan_block(A, b, std::nullopt, reverse, transpose);
}

at::Tensor part_scan(TimeShards* shards, const at::Tensor& a, const at::Tensor& b, int64_t k,
                     const std::optional<at::Tensor>& x0, bool reverse, bool transpose) {
  if (k == 1) return diag_scan(shards, a, b, x0, reverse);
  const int64_t B = b.size(0), T = b.size(1), S = b.size(2);
  const at::Tensor A = a.view({B, T, S / k, k, k}), bb = b.view({B, T, S / k, k});
  if (shards) return sharded_scan_block(*shards, A, bb, std::nullopt, reverse, transpose).view({B, T, S});
  const std::optional<at::Tensor> entry = x0 ? std::optional<at::Tensor>(x0->view({B, S / k, k})) : std::nullopt;
  return scan_block(A, bb, entry, reverse, transpose).view({B, T, S});
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

// x_{t+1} for every step of x [B, T, ...], zero after the sequence's end (time shards: the
// next shard's first step after this shard's last).
at::Tensor next_steps(const at::Tensor& x, TimeShards* shards) { return shift_in_time(x, true, 0.0, shards); }

// [B]: the first step whose entry of x [B, T] is true, T where none is.
at::Tensor first_step(const at::Tensor& x) {
  const int64_t T = x.size(1);
  if (T == 0) return at::zeros({x.size(0)}, x.options().dtype(at::kLong));  // an empty time shard
  const at::Tensor t = at::arange(T, x.options().dtype(at::kLong)).unsqueeze(0);
  return at::where(x, t, T).amin(1);
}

at::Tensor sequential_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0,
                             const at::Tensor& resets, const at::Tensor& entering) {
  // A built-in per-channel cell's loop is one fused pass.
  if (const Cell* builtin = dynamic_cast<const Cell*>(&cell)) {
    if (std::optional<at::Tensor> states = builtin->loop(gi, s0, resets, entering)) return *states;
  }
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

}  // namespace

// The loop's states over the whole sequence.
at::Tensor loop_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const at::Tensor& resets,
                       TimeShards* shards) {
  return shards ? pipelined_states(cell, gi, s0, resets, *shards) : sequential_states(cell, gi, s0, resets);
}

}  // namespace pnewton
