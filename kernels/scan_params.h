#pragma once
#include <cstdint>

#include "kernels/host_device.h"
#include "kernels/scan_element.h"

namespace pnewton {

// Storage types the kernels accept. fp16/bf16 are stored narrow and accumulated in fp32.
enum class DType : int { f32, f64, f16, bf16 };

// One linear recurrence per (batch b, block h), over time t = 0..T-1:
//
//   x_t = A_t x_{t-1} + b_t        (A_t is k x k; A_tᵀ when `transpose`)
//
// The diagonal scan is the case k = 1 with H = D. Every pointer comes with element
// strides, so time-first or otherwise non-contiguous views need no copy.
//
// `reverse` processes t = T-1 down to 0 (x_t = A_t x_{t+1} + b_t). `shift` makes the
// multiplier at each step the previously processed step's matrix (A_{t-1} forward,
// A_{t+1} reverse) and drops x0: it is the adjoint recurrence of the opposite direction,
//   λ_t = g_t + A_{t+1}ᵀ λ_{t+1},
// which is why a backward pass is this same scan with reverse, transpose and shift set.
struct ScanParams {
  int64_t B = 0, T = 0, H = 0, k = 1;
  const void* A = nullptr;   // [B, T, H, k, k]
  int64_t A_stride[5] = {0, 0, 0, 0, 0};
  const void* b = nullptr;   // [B, T, H, k]
  int64_t b_stride[4] = {0, 0, 0, 0};
  const void* x0 = nullptr;  // [B, H, k], or nullptr for zeros
  int64_t x0_stride[3] = {0, 0, 0};
  void* x = nullptr;         // [B, T, H, k], output
  int64_t x_stride[4] = {0, 0, 0, 0};
  bool reverse = false;
  bool transpose = false;
  bool shift = false;
};

// Time index of the pos-th processed step.
PNEWTON_HD int64_t time_at(const ScanParams& p, int64_t pos) {
  return p.reverse ? p.T - 1 - pos : pos;
}

// Time index of the coefficient used by the pos-th step, or -1 when the step's
// multiplier is zero (the first step of a shifted scan, whose predecessor is outside).
PNEWTON_HD int64_t coefficient_time(const ScanParams& p, int64_t pos) {
  if (!p.shift) return time_at(p, pos);
  return pos == 0 ? -1 : time_at(p, pos - 1);
}

template <typename scalar_t>
PNEWTON_HD StridedMatrix<scalar_t> coefficient(const ScanParams& p, int64_t b, int64_t t, int64_t h) {
  const scalar_t* base = static_cast<const scalar_t*>(p.A) + b * p.A_stride[0] + t * p.A_stride[1] +
                         h * p.A_stride[2];
  return p.transpose ? StridedMatrix<scalar_t>{base, p.A_stride[4], p.A_stride[3]}
                     : StridedMatrix<scalar_t>{base, p.A_stride[3], p.A_stride[4]};
}

template <typename scalar_t>
PNEWTON_HD const scalar_t* input_at(const ScanParams& p, int64_t b, int64_t t, int64_t h) {
  return static_cast<const scalar_t*>(p.b) + b * p.b_stride[0] + t * p.b_stride[1] + h * p.b_stride[2];
}

template <typename scalar_t>
PNEWTON_HD scalar_t* output_at(const ScanParams& p, int64_t b, int64_t t, int64_t h) {
  return static_cast<scalar_t*>(p.x) + b * p.x_stride[0] + t * p.x_stride[1] + h * p.x_stride[2];
}

// The state before the first step: x0 for an unshifted scan, zeros otherwise.
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void load_initial_state(const ScanParams& p, int64_t b, int64_t h, acc_t* state) {
  const int k = block_size<K>(p.k);
  const scalar_t* x0 = static_cast<const scalar_t*>(p.x0);
  for (int i = 0; i < k; ++i) {
    state[i] = (x0 == nullptr || p.shift)
                   ? acc_t(0)
                   : static_cast<acc_t>(x0[b * p.x0_stride[0] + h * p.x0_stride[1] + i * p.x0_stride[2]]);
  }
}

}  // namespace pnewton
