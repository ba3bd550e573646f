#pragma once
// The fused per-iteration pass of the built-in cells (DESIGN §1): once the recurrent GEMM
// has given W_hh h for every step (the per-channel cells need none), one pass over
// (gi, W_hh h, s) writes f(s), the part of ∂f/∂s that the method scans (its diagonal, or
// the 2×2 (h_i, c_i) blocks of an LSTM) and the residual s_t − f(s_{t−1}) with the
// padding and reset masks folded in, so no gate tensor, no Jacobian beyond what the scan
// reads and no separate masking pass is materialised. b_hh is added here (no broadcast
// copy before the GEMM). The math of one channel (`fused_point`) is written once over a
// value type V: a scalar in the CUDA kernel (kernels/cell_fused_cuda.cu), a SIMD vector of
// channels in the CPU loop (csrc/cpu/cell_kernels.cpp, at::vec). csrc/solver/cells.cpp
// keeps the ATen form for dense Jacobians, autograd, and as the reference.
#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"
#include "kernels/scan_params.h"

namespace pnewton {

enum class FusedCell : int { gru, lstm, rnn_tanh, rnn_relu };
// none: f only. diagonal: the diagonal of ∂f/∂s [N, S]. block2: LSTM (h_i, c_i) blocks [N, D, 2, 2].
enum class FusedPart : int { none, diagonal, block2 };

PNEWTON_HD int fused_gates(FusedCell cell) {
  return cell == FusedCell::gru ? 3 : cell == FusedCell::lstm ? 4 : 1;
}

// Rows are steps: gi [N, G·D] (torch.nn gate order, b_ih included), gh [N, G·D] = h W_hhᵀ
// without b_hh (unused for per-channel weights: gh = w ⊙ h is formed here), s [N, S] the
// state each step reads (LSTM: (h_i, c_i) interleaved, S = 2D), w [G·D] the diagonal of
// each D×D gate block of W_hh (per-channel cells: W_hh itself), b [G·D] b_hh or null.
// current [N, S] (or null: no residual) is the state s_t of each row: R = current − F,
// zero on padding rows. reset rows (a segment's head, which reads s0) get a zero Jacobian.
// Row maxima (CPU only; null to skip): max_s |R| and max_s |F| (0 on padding), NaN-propagating.
// Shifted reads (T > 0, the solver's iteration): s and gh hold the rows' own states (and
// their W_hh h), and row n = b·T + t reads row n − 1, its sequence's entering state first[b]
// (first_gh[b]) at t = 0, s0[b] (s0_gh[b]) on a reset row — so the previous states are
// never copied out. T = 0: row n reads row n of s and gh.
// All contiguous, one dtype (masks: bool).
struct FusedCellParams {
  FusedCell cell = FusedCell::gru;
  FusedPart part = FusedPart::none;
  bool diagonal_weights = false;
  int64_t N = 0, D = 0;
  const void* gi = nullptr;
  const void* gh = nullptr;
  const void* b = nullptr;
  const void* w = nullptr;
  const void* s = nullptr;
  const void* current = nullptr;
  const bool* padding = nullptr;
  const bool* reset = nullptr;
  void* F = nullptr;  // [N, S]
  void* J = nullptr;  // [N, S] or [N, D, 2, 2]; unused for FusedPart::none
  void* R = nullptr;  // [N, S] when current is given
  void* row_residual = nullptr;  // [N]
  void* row_scale = nullptr;     // [N]
  int64_t T = 0;
  const void* first = nullptr;     // [B, S]
  const void* first_gh = nullptr;  // [B, G·D] (dense weights)
  const void* s0 = nullptr;        // [B, S] (with reset rows)
  const void* s0_gh = nullptr;     // [B, G·D]
};

// The state row [S] and W_hh h row [G·D] (null for per-channel weights) that row n reads.
template <typename T>
PNEWTON_HD void fused_sources(const FusedCellParams& p, int64_t n, int64_t S, const T*& s, const T*& gh) {
  const int64_t GD = fused_gates(p.cell) * p.D;
  const T* states = static_cast<const T*>(p.s);
  const T* ghs = static_cast<const T*>(p.gh);
  int64_t row = n;
  if (p.T > 0) {
    const int64_t b = n / p.T;
    if (p.reset && p.reset[n]) {
      states = static_cast<const T*>(p.s0), ghs = static_cast<const T*>(p.s0_gh), row = b;
    } else if (n % p.T == 0) {
      states = static_cast<const T*>(p.first), ghs = static_cast<const T*>(p.first_gh), row = b;
    } else {
      row = n - 1;
    }
  }
  s = states + row * S;
  gh = ghs ? ghs + row * GD : nullptr;
}

// The Newton update of rows of S numbers, N = B·T rows, T per sequence (CPU): for a step x
// (x = −δ for the Newton methods, sign −1) next = s + sign·x with non-finite numbers set to
// 0, where the row's sequence is moving, and next = s where it is not; x counts as 0 on
// padding rows. row_step [N]: max_s |x| (0 on padding rows), NaN propagating.
struct NewtonUpdateParams {
  int64_t N = 0, T = 0, S = 0;
  double sign = -1;
  const void* s = nullptr;
  const void* x = nullptr;
  const bool* moving = nullptr;   // [B]
  const bool* padding = nullptr;  // [N] or null
  void* next = nullptr;           // [N, S]
  void* row_step = nullptr;       // [N]
};

// exp and tanh of a scalar; the CPU loop supplies the same for at::vec vectors.
struct ScalarMath {
  template <typename T>
  static PNEWTON_HD T exp(T x) {
    using std::exp;
    return exp(x);
  }
  template <typename T>
  static PNEWTON_HD T tanh(T x) {
    using std::tanh;
    return tanh(x);
  }
  // max(x, 0), NaN propagating (torch.relu), and the step 1[x > 0].
  template <typename T>
  static PNEWTON_HD T relu(T x) {
    return x > T(0) || x != x ? x : T(0);
  }
  template <typename T>
  static PNEWTON_HD T positive(T x) {
    return x > T(0) ? T(1) : T(0);
  }
};

// One channel's outputs: F = (h', c') (c' for the LSTM only) and the Jacobian entries
// J = [[∂h'/∂h, ∂h'/∂c], [∂c'/∂h, ∂c'/∂c]] (J[0] alone for the one-state cells).
template <typename V>
struct FusedPoint {
  V F[2];
  V J[4];
};

template <typename V, typename M>
PNEWTON_HD V fused_sigmoid(V v) {
  return V(1) / (V(1) + M::exp(V(0) - v));
}

// x[k]: gate k's pre-activation gi_k + gh_k + b_k, except the GRU's candidate: x[2] = gi_n
// and hn = gh_n + b_n (r multiplies hn). h, c: the previous state; w[k]: the diagonal of
// gate block k of W_hh. jacobian: whether J is wanted.

template <typename V, typename M>
PNEWTON_HD FusedPoint<V> fused_point(FusedCell cell, bool jacobian, const V* x, V hn, V h, V c, const V* w) {
  FusedPoint<V> out;
  if (cell == FusedCell::gru) {
    const V r = fused_sigmoid<V, M>(x[0]), z = fused_sigmoid<V, M>(x[1]);
    const V n = M::tanh(x[2] + r * hn);
    out.F[0] = (V(1) - z) * n + z * h;
    if (!jacobian) return out;
    // ∂h'/∂h_d through r, z, n and the direct z·h term.
    const V dn = (V(1) - z) * (V(1) - n * n);
    out.J[0] = dn * r * w[2] + dn * hn * r * (V(1) - r) * w[0] + (h - n) * z * (V(1) - z) * w[1] + z;
    return out;
  }
  if (cell == FusedCell::rnn_tanh) {
    out.F[0] = M::tanh(x[0]);
    if (jacobian) out.J[0] = (V(1) - out.F[0] * out.F[0]) * w[0];
    return out;
  }
  if (cell == FusedCell::rnn_relu) {
    out.F[0] = M::relu(x[0]);
    if (jacobian) out.J[0] = M::positive(x[0]) * w[0];
    return out;
  }
  const V i = fused_sigmoid<V, M>(x[0]), f = fused_sigmoid<V, M>(x[1]), g = M::tanh(x[2]);
  const V o = fused_sigmoid<V, M>(x[3]);
  const V c_new = f * c + i * g, tc = M::tanh(c_new);
  out.F[0] = o * tc;
  out.F[1] = c_new;
  if (!jacobian) return out;
  const V dc_dh = g * i * (V(1) - i) * w[0] + c * f * (V(1) - f) * w[1] + i * (V(1) - g * g) * w[2];
  const V dh_dc = o * (V(1) - tc * tc);
  out.J[0] = tc * o * (V(1) - o) * w[3] + dh_dc * dc_dh;
  out.J[1] = dh_dc * f;
  out.J[2] = dc_dh;
  out.J[3] = f;
  return out;
}

// Channel d of row n, scalar (the CUDA kernel's thread). No row maxima.
template <typename T>
PNEWTON_HD void fused_cell_element(const FusedCellParams& p, int64_t n, int64_t d) {
  const int64_t D = p.D;
  const int G = fused_gates(p.cell);
  const bool lstm = p.cell == FusedCell::lstm;
  const int64_t S = lstm ? 2 * D : D;
  const T* gi = static_cast<const T*>(p.gi) + n * G * D;
  const T *s, *gh;  // gh: null for per-channel weights
  fused_sources<T>(p, n, S, s, gh);
  const T* b = static_cast<const T*>(p.b);
  const T* wd = static_cast<const T*>(p.w);
  const T h = lstm ? s[2 * d] : s[d], c = lstm ? s[2 * d + 1] : T(0);
  T x[4], w[4], hn = T(0);
  PNEWTON_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (k >= G) break;
    w[k] = wd[k * D + d];
    const T hk = (p.diagonal_weights ? w[k] * h : gh[k * D + d]) + (b ? b[k * D + d] : T(0));
    if (p.cell == FusedCell::gru && k == 2) {
      hn = hk, x[k] = gi[k * D + d];
    } else {
      x[k] = gi[k * D + d] + hk;
    }
  }
  const bool jacobian = p.part != FusedPart::none;
  const FusedPoint<T> out = fused_point<T, ScalarMath>(p.cell, jacobian, x, hn, h, c, w);
  const bool padded = p.padding && p.padding[n], reset = p.reset && p.reset[n];
  T* F = static_cast<T*>(p.F);
  T* R = static_cast<T*>(p.R);
  const T* cur = static_cast<const T*>(p.current);
  T* J = static_cast<T*>(p.J);
  const int states = lstm ? 2 : 1;
  for (int k = 0; k < states; ++k) {
    const int64_t i = n * S + (lstm ? 2 * d + k : d);
    F[i] = out.F[k];
    if (cur) R[i] = padded ? T(0) : cur[i] - out.F[k];
  }
  if (!jacobian) return;
  if (p.part == FusedPart::block2) {
    T* blk = J + (n * D + d) * 4;
    PNEWTON_UNROLL
    for (int k = 0; k < 4; ++k) blk[k] = reset ? T(0) : out.J[k];
  } else if (lstm) {
    J[n * S + 2 * d] = reset ? T(0) : out.J[0];
    J[n * S + 2 * d + 1] = reset ? T(0) : out.J[3];
  } else {
    J[n * S + d] = reset ? T(0) : out.J[0];
  }
}

}  // namespace pnewton
