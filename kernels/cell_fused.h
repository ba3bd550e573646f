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
// blocks: a multi-head cell's blocks (heads W [H, G·k, k], D = H·k), [N, H, k, k] (GRU) or
// [N, H, 2k, 2k] over each head's interleaved (h, c) (LSTM).
enum class FusedPart : int { none, diagonal, block2, blocks };

PNEWTON_HD int fused_gates(FusedCell cell) {
  return cell == FusedCell::gru ? 3 : cell == FusedCell::lstm ? 4 : 1;
}

// Rows are steps: gi [N, G·D] (torch.nn gate order, b_ih included), gh [N, G·D] = h W_hhᵀ
// without b_hh (unused for per-channel weights: gh = w ⊙ h is formed here), s [N, S] the
// state each step reads (LSTM: (h_i, c_i) interleaved, S = 2D), w [G·D] the diagonal of
// each D×D gate block of W_hh (per-channel cells: W_hh itself), b [G·D] b_hh or null.
// current [N, S] (or null: no residual) is the state s_t of each row: R = current − F,
// zero on padding rows. reset rows (a segment's head, which reads s0) get a zero Jacobian.
// Row reductions (null to skip): max_s |R| and the row's scale max_s |current| (max_s |F|
// without current) (0 on padding), NaN-propagating, and Σ_s R² (the merit's part). The
// scale is the state's, not f's: away from the solution f can be far larger than the
// states it was evaluated at (a cubic drift at a diverged iterate), and the stop test's
// relative tolerance must not grow with it.
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
  void* F = nullptr;  // [N, S], or null where nothing reads f (an iteration's R carries it)
  void* J = nullptr;  // [N, S] or [N, D, 2, 2]; unused for FusedPart::none
  void* R = nullptr;  // [N, S] when current is given
  // The row reductions, each as [N, row_parts] partial results over parts of the row's
  // channels (a CUDA kernel's warps: fused_row_parts), which the caller combines.
  void* row_residual = nullptr;
  void* row_scale = nullptr;
  void* row_square = nullptr;    // Σ_s R² (0 on padding rows)
  int64_t row_parts = 1;
  int64_t T = 0;
  const void* first = nullptr;     // [B, S]
  const void* first_gh = nullptr;  // [B, G·D] (dense weights)
  const void* s0 = nullptr;        // [B, S] (with reset rows)
  const void* s0_gh = nullptr;     // [B, G·D]
  // A multi-head cell's W_hh as columns [G, k, D] (C[g][c][h·k + j] = W[h, g·k + j, c]) and
  // its head size k: the blocks of FusedPart::blocks are formed from them, and, in the CPU
  // pass, W_hh h where gh is null (csrc/cpu/cell_kernels.cpp, csrc/solver/cells_fused.cpp).
  const void* heads = nullptr;
  int64_t k = 0;
};

// The sequence b = n / T of row n and its step n − b·T. A GPU divides 64-bit integers in
// software (about a hundred instructions, as much as a GRU channel's math): 32 bits where
// the numbers fit, which the whole warp decides alike.
PNEWTON_HD void row_sequence(int64_t n, int64_t T, int64_t& b, int64_t& t) {
  if ((n | T) >> 32 == 0) {
    const uint32_t n32 = static_cast<uint32_t>(n), T32 = static_cast<uint32_t>(T);
    b = n32 / T32, t = n32 - static_cast<uint32_t>(b) * T32;
  } else {
    b = n / T, t = n - b * T;
  }
}

// The state row [S] and W_hh h row [G·D] (null for per-channel weights) that row n reads.
template <typename T, typename I = int64_t>
PNEWTON_HD void fused_sources(const FusedCellParams& p, I n, I S, const T*& s, const T*& gh) {
  const I GD = fused_gates(p.cell) * static_cast<I>(p.D);
  const T* states = static_cast<const T*>(p.s);
  const T* ghs = static_cast<const T*>(p.gh);
  I row = n;
  if (p.T > 0) {
    int64_t b, t;
    row_sequence(n, p.T, b, t);
    if (p.reset && p.reset[n]) {
      states = static_cast<const T*>(p.s0), ghs = static_cast<const T*>(p.s0_gh), row = static_cast<I>(b);
    } else if (t == 0) {
      states = static_cast<const T*>(p.first), ghs = static_cast<const T*>(p.first_gh), row = static_cast<I>(b);
    } else {
      row = n - 1;
    }
  }
  s = states + row * S;
  gh = ghs ? ghs + row * GD : nullptr;
}

// The Newton update of rows of S numbers, N = B·T rows, T per sequence: for a step x
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
// J = [[∂h'/∂h, ∂h'/∂c], [∂c'/∂h, ∂c'/∂c]] (J[0] alone for the one-state cells), and the
// coefficients of gate k's weight row in them (coef[k]: ∂h'/∂gh_k, GRU; ∂c'/∂gh_k for
// k < 3 and ∂h'/∂gh_3 without the path through c', LSTM), whose products with a head's full
// weight rows give its blocks (FusedPart::blocks).
template <typename V>
struct FusedPoint {
  V F[2];
  V J[4];
  V coef[4];
  V dh_dc;  // LSTM: ∂h'/∂c'
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
    out.coef[0] = dn * hn * r * (V(1) - r), out.coef[1] = (h - n) * z * (V(1) - z), out.coef[2] = dn * r;
    out.J[0] = out.coef[2] * w[2] + out.coef[0] * w[0] + out.coef[1] * w[1] + z;
    out.J[3] = z;  // the direct term (the diagonal of a block)
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
  out.coef[0] = g * i * (V(1) - i), out.coef[1] = c * f * (V(1) - f), out.coef[2] = i * (V(1) - g * g);
  out.coef[3] = tc * o * (V(1) - o);
  const V dc_dh = out.coef[0] * w[0] + out.coef[1] * w[1] + out.coef[2] * w[2];
  const V dh_dc = o * (V(1) - tc * tc);
  out.dh_dc = dh_dc;
  out.J[0] = out.coef[3] * w[3] + dh_dc * dc_dh;
  out.J[1] = dh_dc * f;
  out.J[2] = dc_dh;
  out.J[3] = f;
  return out;
}

// ---- the vector-Jacobian product of the backward (DESIGN §1, gradients) ----

// The cotangents of one channel's step for a cotangent (v_h, v_c) of its outputs (h', c'):
// of the gate pre-activations through gi (gi[k]) and through gh = W_hh h + b_hh (gh[k]: the
// same but for the GRU's n gate, which r scales), and of the previous (h, c) through the
// step's direct paths (GRU: z·v_h; LSTM's c: f·dc), W_hh's path left to the caller.
template <typename V>
struct FusedVjpPoint {
  V gi[4], gh[4], h, c;
};

template <typename V, typename M>
PNEWTON_HD FusedVjpPoint<V> fused_vjp_point(FusedCell cell, const V* x, V hn, V h, V c, V v_h, V v_c) {
  FusedVjpPoint<V> out;
  out.h = V(0), out.c = V(0);
  if (cell == FusedCell::gru) {
    const V r = fused_sigmoid<V, M>(x[0]), z = fused_sigmoid<V, M>(x[1]);
    const V n = M::tanh(x[2] + r * hn);
    const V da_n = v_h * (V(1) - z) * (V(1) - n * n);
    out.gi[0] = out.gh[0] = da_n * hn * r * (V(1) - r);
    out.gi[1] = out.gh[1] = v_h * (h - n) * z * (V(1) - z);
    out.gi[2] = da_n, out.gh[2] = da_n * r;
    out.h = v_h * z;
    return out;
  }
  if (cell == FusedCell::rnn_tanh || cell == FusedCell::rnn_relu) {
    const V y = cell == FusedCell::rnn_tanh ? M::tanh(x[0]) : V(0);
    out.gi[0] = out.gh[0] = cell == FusedCell::rnn_tanh ? v_h * (V(1) - y * y) : v_h * M::positive(x[0]);
    return out;
  }
  const V i = fused_sigmoid<V, M>(x[0]), f = fused_sigmoid<V, M>(x[1]), g = M::tanh(x[2]);
  const V o = fused_sigmoid<V, M>(x[3]);
  const V tc = M::tanh(f * c + i * g);
  const V dc = v_c + v_h * o * (V(1) - tc * tc);
  out.gi[0] = out.gh[0] = dc * g * i * (V(1) - i);
  out.gi[1] = out.gh[1] = dc * c * f * (V(1) - f);
  out.gi[2] = out.gh[2] = dc * i * (V(1) - g * g);
  out.gi[3] = out.gh[3] = v_h * tc * o * (V(1) - o);
  out.c = dc * f;
  return out;
}

// The VJP of the cell at rows (s, gi) for cotangents v [N, S] (rows as FusedCellParams',
// no shifted reads): grad_gi [N, G·D]; grad_gh [N, G·D], or null where it equals grad_gi
// (every cell but the GRU); grad_s [N, S]: the direct paths, plus Σ_k w_k grad_gh_k for
// per-channel weights (complete then; dense weights add grad_gh W_hh after).
struct FusedVjpParams {
  FusedCell cell = FusedCell::gru;
  bool diagonal_weights = false;
  int64_t N = 0, D = 0;
  const void* gi = nullptr;
  const void* gh = nullptr;  // [N, G·D] W_hh h without b_hh (dense weights), else null
  const void* b = nullptr;
  const void* w = nullptr;   // per-channel weights [G·D] (diagonal_weights only)
  const void* s = nullptr;
  const void* v = nullptr;
  void* grad_gi = nullptr;
  void* grad_gh = nullptr;
  void* grad_s = nullptr;
};

// ---- the scalar form: the CUDA kernels' threads (and their CPU mirror in the tests) ----

// max(a, b), NaN propagating: a NaN in either stays (NaN > x and x > NaN are both false).
template <typename T>
PNEWTON_HD T nan_max(T a, T b) {
  return b > a || b != b ? b : a;
}

// Channel d's gate inputs from a row's gi and W_hh h (gh, null for per-channel weights,
// whose w ⊙ h is formed here), b_hh (or null) and the per-gate weights wd [G·D] (the
// diagonals of W_hh's gate blocks): x[k] as fused_point takes them, w[k], and the GRU's hn.
template <typename T, typename I = int64_t>
PNEWTON_HD void gate_inputs(FusedCell cell, bool diagonal_weights, I D, I d, const T* gi, const T* gh,
                            const T* b, const T* wd, T h, T* x, T* w, T& hn) {
  const int G = fused_gates(cell);
  hn = T(0);
  PNEWTON_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (k >= G) break;
    w[k] = wd ? wd[k * D + d] : T(0);
    const T hk = (diagonal_weights ? w[k] * h : gh[k * D + d]) + (b ? b[k * D + d] : T(0));
    if (cell == FusedCell::gru && k == 2) {
      hn = hk, x[k] = gi[k * D + d];
    } else {
      x[k] = gi[k * D + d] + hk;
    }
  }
}

// What one thread's share of a row adds to the row's reductions: max |R|, the scale
// (NaN propagating) and Σ R².
template <typename T>
struct FusedRowShare {
  T residual = T(0), scale = T(0), square = T(0);

  PNEWTON_HD void add(const FusedRowShare& o) {
    residual = nan_max(residual, o.residual), scale = nan_max(scale, o.scale), square += o.square;
  }
};

// One channel d of row n as the pass reads it: the previous state (h, c), the gate inputs
// (x, hn) and per-gate weights, and the state the row holds (cur, for the residual). A
// thread may load several rows' channels before computing any (fused_cell_kernel's rows
// per thread), so that more loads are in flight.
template <typename T>
struct FusedChannelIn {
  T h, c, x[4], w[4], hn, cur[2];
};

template <typename T, typename I = int64_t>
PNEWTON_HD FusedChannelIn<T> fused_channel_load(const FusedCellParams& p, I n, I d) {
  const I D = static_cast<I>(p.D);
  const bool lstm = p.cell == FusedCell::lstm;
  const I S = lstm ? 2 * D : D;
  const T *s, *gh;  // gh: null for per-channel weights
  fused_sources<T, I>(p, n, S, s, gh);
  FusedChannelIn<T> in;
  in.h = lstm ? s[2 * d] : s[d], in.c = lstm ? s[2 * d + 1] : T(0);
  gate_inputs<T, I>(p.cell, p.diagonal_weights, D, d, static_cast<const T*>(p.gi) + n * fused_gates(p.cell) * D, gh,
                 static_cast<const T*>(p.b), static_cast<const T*>(p.w), in.h, in.x, in.w, in.hn);
  if (p.current) {
    const T* cur = static_cast<const T*>(p.current) + n * S;
    in.cur[0] = lstm ? cur[2 * d] : cur[d], in.cur[1] = lstm ? cur[2 * d + 1] : T(0);
  }
  return in;
}

// The numbers of a row of J.
template <typename I>
PNEWTON_HD I fused_jacobian_row(const FusedCellParams& p) {
  const I D = static_cast<I>(p.D), k = static_cast<I>(p.k);
  const bool lstm = p.cell == FusedCell::lstm;
  if (p.part == FusedPart::blocks) return (lstm ? 4 : 1) * D * k;
  return p.part == FusedPart::block2 ? 4 * D : (lstm ? 2 * D : D);
}

// Channel d's rows of its head's block (FusedPart::blocks): row d mod k of head d / k is
// Σ_g coef[g] W[head, g·k + row, ·] (FusedCellParams::heads holds W as columns), plus the
// direct terms; zero on reset rows. GRU: [H, k, k]. LSTM: [H, 2k, 2k] over the head's
// interleaved (h, c), the channel's rows 2·row (h') and 2·row + 1 (c').
template <typename T, typename I = int64_t>
PNEWTON_HD void fused_block_row(const FusedCellParams& p, I d, const FusedPoint<T>& out, bool reset,
                                T* __restrict__ J) {
  const I k = static_cast<I>(p.k), D = static_cast<I>(p.D), head = d / k, row = d - head * k;
  const int G = fused_gates(p.cell);
  const T* __restrict__ C = static_cast<const T*>(p.heads);
  for (I c = 0; c < k; ++c) {
    T through[4];
    PNEWTON_UNROLL
    for (int g = 0; g < 4; ++g) {
      if (g >= G) break;
      through[g] = out.coef[g] * C[(g * k + c) * D + d];
    }
    const T on_diagonal = row == c ? T(1) : T(0);
    if (p.cell != FusedCell::lstm) {
      J[d * k + c] = reset ? T(0) : through[0] + through[1] + through[2] + on_diagonal * out.J[3];  // + z
      continue;
    }
    const T dc_dh = through[0] + through[1] + through[2];
    T* h_row = J + head * 4 * k * k + 2 * row * 2 * k;
    T* c_row = h_row + 2 * k;
    h_row[2 * c] = reset ? T(0) : through[3] + out.dh_dc * dc_dh;        // ∂h'/∂h_c
    h_row[2 * c + 1] = reset ? T(0) : on_diagonal * out.dh_dc * out.J[3];  // ∂h'/∂c_c: (∂h'/∂c') f
    c_row[2 * c] = reset ? T(0) : dc_dh;
    c_row[2 * c + 1] = reset ? T(0) : on_diagonal * out.J[3];  // ∂c'/∂c_c: f
  }
}

// Channel d of row n from its inputs: F (where asked for), J and R written, its part of the row's reductions
// added to `share`. The outputs alias no input (restricted).
template <typename T, typename I = int64_t>
PNEWTON_HD void fused_channel_store(const FusedCellParams& p, I n, I d, const FusedChannelIn<T>& in,
                                    FusedRowShare<T>& share) {
  const I D = static_cast<I>(p.D);
  const bool lstm = p.cell == FusedCell::lstm, jacobian = p.part != FusedPart::none;
  const I S = lstm ? 2 * D : D;
  T* __restrict__ F = p.F ? static_cast<T*>(p.F) + n * S : nullptr;
  T* __restrict__ R = p.R ? static_cast<T*>(p.R) + n * S : nullptr;
  T* __restrict__ J = jacobian ? static_cast<T*>(p.J) + n * fused_jacobian_row<I>(p) : nullptr;
  const bool padded = p.padding && p.padding[n], reset = p.reset && p.reset[n];
  const FusedPoint<T> out = fused_point<T, ScalarMath>(p.cell, jacobian, in.x, in.hn, in.h, in.c, in.w);
  const int states = lstm ? 2 : 1;
  for (int k = 0; k < states; ++k) {
    const I i = lstm ? 2 * d + k : d;
    if (F) F[i] = out.F[k];
    const T size = p.current ? in.cur[k] : out.F[k];
    share.scale = nan_max(share.scale, size < T(0) ? -size : size);
    if (p.current) {
      const T r = padded ? T(0) : in.cur[k] - out.F[k];
      R[i] = r;
      share.residual = nan_max(share.residual, r < T(0) ? -r : r);
      share.square += r * r;
    }
  }
  if (!jacobian) return;
  if (p.part == FusedPart::blocks) {
    fused_block_row<T, I>(p, d, out, reset, J);
  } else if (p.part == FusedPart::block2) {
    PNEWTON_UNROLL
    for (int k = 0; k < 4; ++k) J[4 * d + k] = reset ? T(0) : out.J[k];
  } else if (lstm) {
    J[2 * d] = reset ? T(0) : out.J[0];
    J[2 * d + 1] = reset ? T(0) : out.J[3];
  } else {
    J[d] = reset ? T(0) : out.J[0];
  }
}

// Channels first, first + stride, ... < D of row n: F, J and R written, the share of the
// row's reductions returned. A CUDA kernel gives each row a group of `stride` threads
// (coalesced: neighbouring threads read neighbouring channels); stride 1 is the whole row.
template <typename T, typename I = int64_t>
PNEWTON_HD FusedRowShare<T> fused_cell_row_share(const FusedCellParams& p, I n, I first, I stride) {
  FusedRowShare<T> share;
  for (I d = first; d < static_cast<I>(p.D); d += stride) {
    fused_channel_store<T, I>(p, n, d, fused_channel_load<T, I>(p, n, d), share);
  }
  return share;
}

// Partial result `part` of row n's reductions from the shares it combines (0 on padding
// rows), where asked for.
template <typename T, typename I = int64_t>
PNEWTON_HD void fused_cell_row_finish(const FusedCellParams& p, I n, I part, const FusedRowShare<T>& row) {
  const bool padded = p.padding && p.padding[n];
  const I i = n * static_cast<I>(p.row_parts) + part;
  if (p.row_residual) static_cast<T*>(p.row_residual)[i] = padded ? T(0) : row.residual;
  if (p.row_scale) static_cast<T*>(p.row_scale)[i] = padded ? T(0) : row.scale;
  if (p.row_square) static_cast<T*>(p.row_square)[i] = padded ? T(0) : row.square;
}

// Channels first, first + stride, ... of row n of the VJP (shares as fused_cell_row_share's;
// nothing to reduce).
template <typename T, typename I = int64_t>
PNEWTON_HD void fused_vjp_row_share(const FusedVjpParams& p, I n, I first, I stride) {
  const I D = static_cast<I>(p.D);
  const int G = fused_gates(p.cell);
  const bool lstm = p.cell == FusedCell::lstm;
  const I S = lstm ? 2 * D : D;
  const T* __restrict__ gi = static_cast<const T*>(p.gi) + n * G * D;
  const T* __restrict__ gh = p.gh ? static_cast<const T*>(p.gh) + n * G * D : nullptr;
  const T* __restrict__ b = static_cast<const T*>(p.b);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* __restrict__ s = static_cast<const T*>(p.s) + n * S;
  const T* __restrict__ v = static_cast<const T*>(p.v) + n * S;
  T* __restrict__ grad_gi = static_cast<T*>(p.grad_gi) + n * G * D;
  T* __restrict__ grad_gh = p.grad_gh ? static_cast<T*>(p.grad_gh) + n * G * D : nullptr;
  T* __restrict__ grad_s = static_cast<T*>(p.grad_s) + n * S;
  for (I d = first; d < D; d += stride) {
    const T h = lstm ? s[2 * d] : s[d], c = lstm ? s[2 * d + 1] : T(0);
    T x[4], wk[4], hn;
    gate_inputs<T, I>(p.cell, p.diagonal_weights, D, d, gi, gh, b, w, h, x, wk, hn);
    const FusedVjpPoint<T> out =
        fused_vjp_point<T, ScalarMath>(p.cell, x, hn, h, c, lstm ? v[2 * d] : v[d], lstm ? v[2 * d + 1] : T(0));
    T through_h = out.h;
    PNEWTON_UNROLL
    for (int k = 0; k < 4; ++k) {
      if (k >= G) break;
      grad_gi[k * D + d] = out.gi[k];
      if (grad_gh) grad_gh[k * D + d] = out.gh[k];
      if (p.diagonal_weights) through_h += wk[k] * out.gh[k];
    }
    if (lstm) {
      grad_s[2 * d] = through_h, grad_s[2 * d + 1] = out.c;
    } else {
      grad_s[d] = through_h;
    }
  }
}

// ---- the loop of a per-channel cell (diagonal weights) ----

// Steps a loop thread loads at a time: each step's math waits on the one before, its loads
// do not, so they are issued a group ahead (double-buffered: the next group's loads are in
// flight while this group is computed; the stores of F could otherwise alias the next
// step's gi for all the compiler knows, and every step would wait a memory latency).
constexpr int kLoopAhead = 8;

// The gi of steps [t0, t0 + kLoopAhead) of one channel (gi: its first step's, a step GD
// apart, a gate D apart) and their reset flags; zeros past the end.
template <typename T, typename I>
PNEWTON_HD void loop_group_load(const T* __restrict__ gi, const bool* __restrict__ reset, I t0, I steps, I GD, I D,
                                int G, T (&in)[kLoopAhead][4], bool (&at_reset)[kLoopAhead]) {
  PNEWTON_UNROLL
  for (int j = 0; j < kLoopAhead; ++j) {
    const I t = t0 + j;
    at_reset[j] = t < steps && reset && reset[t];
    PNEWTON_UNROLL
    for (int k = 0; k < 4; ++k) in[j][k] = k < G && t < steps ? gi[t * GD + k * D] : T(0);
  }
}

// Channel d of a per-channel cell's step reads channel d of the step before only, so the
// step-by-step loop is one pass: channel d of sequence b stepped through its T steps in
// registers, from first[b] (s0[b] at reset rows), every step's state written to F. Of
// FusedCellParams it reads cell, D, T (> 0), gi, w, b, first, s0 and reset (N = B·T rows),
// and writes F. The CUDA loop's thread (kernels/cell_fused_cuda.cu); the CPU loop steps
// vectors of channels the same way (csrc/cpu/cell_kernels.cpp).
template <typename T, typename I = int64_t>
PNEWTON_HD void fused_loop_channel(const FusedCellParams& p, I b, I d) {
  const I D = static_cast<I>(p.D), steps = static_cast<I>(p.T);
  const bool lstm = p.cell == FusedCell::lstm;
  const int G = fused_gates(p.cell);
  const I S = lstm ? 2 * D : D, GD = G * D;
  const T* __restrict__ gi = static_cast<const T*>(p.gi) + b * steps * GD + d;
  const T* __restrict__ first = static_cast<const T*>(p.first) + b * S;
  const T* __restrict__ s0 = p.s0 ? static_cast<const T*>(p.s0) + b * S : nullptr;
  const bool* __restrict__ reset = p.reset ? p.reset + b * steps : nullptr;
  T* __restrict__ F = static_cast<T*>(p.F) + b * steps * S;
  // The channel's weights and b_hh, once (gate_inputs reads them as rows of one channel).
  T w[4], bias[4];
  PNEWTON_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (k >= G) break;
    w[k] = static_cast<const T*>(p.w)[k * D + d];
    bias[k] = p.b ? static_cast<const T*>(p.b)[k * D + d] : T(0);
  }
  T h = lstm ? first[2 * d] : first[d], c = lstm ? first[2 * d + 1] : T(0);
  T in[kLoopAhead][4], next[kLoopAhead][4];
  bool at_reset[kLoopAhead], next_reset[kLoopAhead];
  loop_group_load<T, I>(gi, reset, 0, steps, GD, D, G, in, at_reset);
  for (I t0 = 0; t0 < steps; t0 += kLoopAhead) {
    loop_group_load<T, I>(gi, reset, t0 + kLoopAhead, steps, GD, D, G, next, next_reset);
    PNEWTON_UNROLL
    for (int j = 0; j < kLoopAhead; ++j) {
      const I t = t0 + j;
      if (t >= steps) break;
      if (at_reset[j]) h = lstm ? s0[2 * d] : s0[d], c = lstm ? s0[2 * d + 1] : T(0);
      T x[4], wk[4], hn;
      gate_inputs<T, I>(p.cell, true, 1, 0, in[j], nullptr, p.b ? bias : nullptr, w, h, x, wk, hn);
      const FusedPoint<T> out = fused_point<T, ScalarMath>(p.cell, false, x, hn, h, c, wk);
      h = out.F[0], c = lstm ? out.F[1] : T(0);
      if (lstm) {
        F[t * S + 2 * d] = h, F[t * S + 2 * d + 1] = c;
      } else {
        F[t * S + d] = h;
      }
    }
    PNEWTON_UNROLL
    for (int j = 0; j < kLoopAhead; ++j) {
      at_reset[j] = next_reset[j];
      PNEWTON_UNROLL
      for (int k = 0; k < 4; ++k) in[j][k] = next[j][k];
    }
  }
}

// The update's share of row n (as fused_cell_row_share): next written, max |x| returned.
template <typename T, typename I = int64_t>
PNEWTON_HD T newton_update_row_share(const NewtonUpdateParams& p, I n, I first, I stride) {
  const I S = static_cast<I>(p.S);
  const T* __restrict__ s = static_cast<const T*>(p.s) + n * S;
  const T* __restrict__ x = static_cast<const T*>(p.x) + n * S;
  T* __restrict__ next = static_cast<T*>(p.next) + n * S;
  int64_t b, t;
  row_sequence(n, p.T, b, t);
  const bool padded = p.padding && p.padding[n], moving = p.moving[b] && !padded;
  const T sign = static_cast<T>(p.sign);
  T largest = T(0);
  for (I d = first; d < S; d += stride) {
    if (padded) {
      next[d] = s[d];
      continue;
    }
    const T xd = x[d];
    largest = nan_max(largest, xd < T(0) ? -xd : xd);
    const T v = s[d] + sign * xd;
    next[d] = !moving ? s[d] : v - v == T(0) ? v : T(0);  // v − v is 0 iff v is finite
  }
  return largest;
}

template <typename T>
PNEWTON_HD void newton_update_row_finish(const NewtonUpdateParams& p, int64_t n, T largest) {
  static_cast<T*>(p.row_step)[n] = p.padding && p.padding[n] ? T(0) : largest;
}

}  // namespace pnewton
