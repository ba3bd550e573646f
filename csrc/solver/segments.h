#pragma once
// Variable-length sequences (DESIGN §4b "Segments"), two ways.
//
// Lengths of a padded batch: sequence b of a [B, T, ...] batch has its own length L_b ≤ T,
// and steps t ≥ L_b are padding. The solver keeps them out of the residual (so of the
// convergence test, the iteration counts and the fallback), and the states it returns hold
// still past the length, s_t = s_{L_b − 1} (s0 when L_b = 0), so states[:, T − 1] is each
// sequence's own final state and the gradient of a held state flows to the step it copies.
//
// Segments packed end to end in a row: resets [B, T] (bool) is true at the first step of
// every segment after the row's first. A reset step reads s0 instead of the previous state,
// so its Jacobian with respect to that state is 0 (the scan element Ã_t = 0 forgets the
// past) and nothing carries from one segment into the next, forwards or backwards.
#include <ATen/ATen.h>

namespace pnewton {

// Checks that lengths is a [B] integer tensor (any device) and returns it as int64 on `device`.
at::Tensor lengths_on(const char* op, const at::Tensor& lengths, const c10::SymInt& B, at::Device device);
// The same, and that every length is in [0, T] (one host read: the kernels' check);
// shortest, if given, receives the smallest length (T for an empty batch).
at::Tensor checked_lengths(const char* op, const at::Tensor& lengths, int64_t B, int64_t T, at::Device device,
                           int64_t* shortest = nullptr);

// [B, T, 1] in `dtype`: 1 at steps t < L_b, 0 at padding.
at::Tensor valid_steps(const at::Tensor& lengths, const c10::SymInt& T, at::ScalarType dtype);

// [B, T] int64: the index into [s0, s_1, ..., s_T] that step t holds: t + 1 before the
// length, L_b after it (so 0, i.e. s0, for an empty sequence).
at::Tensor held_index(const at::Tensor& lengths, const c10::SymInt& T);

// states [B, T, S] with every step past its sequence's length replaced by the last valid state.
at::Tensor hold_past_lengths(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& lengths);

// The adjoint of hold_past_lengths: the cotangent of the held states [B, T, S] summed onto
// the steps they copy; returns (grad of the solved states [B, T, S], grad of s0 [B, S]).
std::tuple<at::Tensor, at::Tensor> route_held_gradient(const at::Tensor& grad, const at::Tensor& lengths);


// Checks that resets is a [B, T] bool tensor and returns it on `device`.
at::Tensor checked_resets(const char* op, const at::Tensor& resets, const c10::SymInt& B, const c10::SymInt& T,
                          at::Device device);

// [B, T, 1] in `dtype`: 0 at reset steps, 1 elsewhere (what multiplies a Jacobian row).
at::Tensor carried_steps(const at::Tensor& resets, at::ScalarType dtype);

// The state each step reads, [s0, s_1, ..., s_{T−1}] as [B, T, S], with s0 at the reset steps.
// entering (a time shard's, csrc/distributed/time_shards.h): what step 0 reads instead of s0,
// unless it is a reset step.
at::Tensor previous_steps(const at::Tensor& s0, const at::Tensor& s, const at::Tensor& resets,
                          const at::Tensor& entering = {});

// [B, T] int64: the time index that reverses every segment of a row within itself and leaves
// padding in place (an involution). Segments start at step 0 and at each reset (resets may be
// undefined: one segment) and end before the next start or at the row's length (lengths may
// be undefined: T).
at::Tensor reversed_index(const at::Tensor& lengths, const at::Tensor& resets, const c10::SymInt& T);

// x [B, T, ...] gathered along time by index [B, T].
at::Tensor gather_steps(const at::Tensor& x, const at::Tensor& index);

}  // namespace pnewton
