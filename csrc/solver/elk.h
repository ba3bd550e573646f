#pragma once
// The ELK step (DESIGN §1): the Levenberg–Marquardt step of a parallel Newton iteration as
// Kalman smoothing. With Ã_t the method's Jacobian approximation and r_t = s_t − f(s_{t−1}),
//   δ = argmin Σ_t ‖r_t + δ_t − Ã_t δ_{t−1}‖² + λ Σ_t ‖δ_t‖²,   δ_0 = 0,
// is the posterior mean of the linear-Gaussian model δ_t = Ã_t δ_{t−1} − r_t + w_t,
// w_t ~ N(0, I), observed as 0 = δ_t + v_t, v_t ~ N(0, I/λ). λ → 0 gives the Newton
// (DEER) step, λ → ∞ no step.
//
// Everything is a scan: the covariance recursion (a Riccati map: linear-fractional) by
// the stable parallel-Kalman elements of Särkkä & García-Fernández (2021) combined in a
// log-depth (Hillis–Steele) scan over ATen ops; the filter means and the
// Rauch–Tung–Striebel smoother means are first-order linear recurrences run by the
// pnewton scan ops. `smooth = false` returns the filter means only: the variant the ELK
// paper's released code uses.
#include <ATen/ATen.h>

#include "csrc/distributed/time_shards.h"
#include "pnewton/cell.h"

namespace pnewton {

// a: the approximation in a part of block width k (block_width) — diagonal [B, T, S] (k = 1)
// or k×k blocks viewing as [B, T, S/k, k, k] (dense: k = S); r [B, T, S]; lambda [B] > 0, per
// sequence. Returns δ [B, T, S]. shards: this rank's time shard of the whole sequence's step
// (the diagonal part only: its covariance elements, means and smoother compose across
// shards by one gather and sharded scans each).
at::Tensor elk_delta(const at::Tensor& a, const at::Tensor& r, const at::Tensor& lambda, int64_t k, bool smooth,
                     TimeShards* shards = nullptr);

// Ã_t x_{t−1} for every t (x_0 = 0): the linear model's prediction of a step x.
at::Tensor apply_approximation(const at::Tensor& a, const at::Tensor& x, int64_t k, TimeShards* shards = nullptr);

}  // namespace pnewton
