#pragma once
// The sequence layout of a solve, one place for what every iteration and adjoint asks of
// it: rows of all steps (flat), the state entering this time shard, the shard's part of
// each length, states held past the lengths, the scans over the whole sequence (sharded
// where there are time shards), steps shifted in time, and the step-by-step loop.
#include <ATen/ATen.h>

#include <optional>

#include "csrc/distributed/time_shards.h"
#include "pnewton/cell.h"

namespace pnewton {

// [B, T, ...] -> [B·T, ...]: every step of every sequence as one row.
inline at::Tensor flat(const at::Tensor& x) { return x.flatten(0, 1); }

// The scans of the solver, over the whole sequence: the sharded scans with time shards.
at::Tensor diag_scan(TimeShards* shards, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& x0 = std::nullopt, bool reverse = false);
at::Tensor block_scan(TimeShards* shards, const at::Tensor& A, const at::Tensor& b, bool reverse = false,
                      bool transpose = false);

// x_t = A_t x_{t−1} + b_t (A_tᵀ if transpose) over b [B, T, S] for A in a part of block width
// k (block_width): a [B, T, S] (k = 1) or anything that views as [B, T, S/k, k, k]; x0 [B, S]
// enters (one process only).
at::Tensor part_scan(TimeShards* shards, const at::Tensor& a, const at::Tensor& b, int64_t k,
                     const std::optional<at::Tensor>& x0 = std::nullopt, bool reverse = false, bool transpose = false);

// x_{t+1} for every step of x [B, T, ...], zero after the sequence's end (time shards: the
// next shard's first step after this shard's last).
at::Tensor next_steps(const at::Tensor& x, TimeShards* shards);

// The state entering this time shard: the previous shard's last state of s [B, T, S] (one
// gather), undefined in one process.
at::Tensor entering_state(TimeShards* shards, const at::Tensor& s0, const at::Tensor& s);

// The lengths of this time shard's part of each sequence: clamp(L − offset, 0, T).
at::Tensor shard_lengths(const at::Tensor& lengths, int64_t T, TimeShards* shards);

// states [B, T, S] held still past each length (hold_past_lengths), across time shards.
at::Tensor held_states(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& lengths, TimeShards* shards);

// [B]: the first step whose entry of x [B, T] is true, T where none is.
at::Tensor first_step(const at::Tensor& x);

// The loop's states over the whole sequence (over time shards a pipeline of the ranks).
at::Tensor loop_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const at::Tensor& resets,
                       TimeShards* shards);

}  // namespace pnewton
