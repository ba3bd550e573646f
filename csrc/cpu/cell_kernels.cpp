// The fused passes of a Newton iteration over rows, vectorised across channels with
// at::vec (Sleef's exp, as torch's own sigmoid; Sleef's tanh for float64, float32's below):
// kernels/cell_fused.h's fused_point on Vectorized<T>, with the loads, the masks and the
// row reductions here; and the update of the states. Built once per CPU capability
// (CPU_CAPABILITY = DEFAULT, AVX2, AVX512, with that capability's flags), so this file
// includes nothing but at::vec: as little inline code as possible compiled with wider
// instructions (CMakeLists.txt links these builds after the library's own objects).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "csrc/cpu/cell_kernels.h"

namespace pnewton::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

struct VecMath {
  template <typename V>
  static V exp(V x) {
    return x.exp();
  }
  template <typename V>
  static V tanh(V x) {
    return x.tanh();
  }
  // float: Sleef's tanhf costs about eight expf here (perf: 15% of a GRU iteration, B = 1,
  // T = 4096, D = 64), so from one expf: 1 − 2/(e^{2|x|} + 1) with x's sign for |x| ≥ 0.625,
  // where few digits cancel, and below it the odd Taylor series to x¹⁹ (truncation < 1e-8
  // relative). Within 2 ulp of the float64 tanh (tests/python/test_fused_cells.py), NaN and
  // ±∞ as tanh's.
  static Vectorized<float> tanh(Vectorized<float> x) {
    using V = Vectorized<float>;
    const V a = x.abs();
    const V large = (V(1) - V(2) / ((a + a).exp() + V(1))).copysign(x);
    const V x2 = x * x;
    V series(-443861162.0f / 1856156927625.0f);
    series = series * x2 + V(6404582.0f / 10854718875.0f);
    series = series * x2 + V(-929569.0f / 638512875.0f);
    series = series * x2 + V(21844.0f / 6081075.0f);
    series = series * x2 + V(-1382.0f / 155925.0f);
    series = series * x2 + V(62.0f / 2835.0f);
    series = series * x2 + V(-17.0f / 315.0f);
    series = series * x2 + V(2.0f / 15.0f);
    series = series * x2 + V(-1.0f / 3.0f);
    const V small = x + x * x2 * series;
    return V::blendv(large, small, a < V(0.625f)).copysign(x);  // the sign of ±0 too
  }
  template <typename V>
  static V relu(V x) {
    return at::vec::maximum(x, V(0));  // NaN propagating, as torch.relu
  }
  template <typename V>
  static V positive(V x) {
    return (x > V(0)) & V(1);
  }
};

// max over the lanes, NaN propagating.
template <typename T>
T lane_max(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T best = lanes[0];
  for (int64_t j = 1; j < Vectorized<T>::size(); ++j) {
    if (std::isnan(lanes[j]) || lanes[j] > best) best = lanes[j];  // a NaN best stays: NaN > x is false
  }
  return best;
}

// The sum of the lanes.
template <typename T>
T lane_sum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T sum = 0;
  for (int64_t j = 0; j < Vectorized<T>::size(); ++j) sum += lanes[j];
  return sum;
}

// A multi-head cell's parts of the pass, vectorised across channels: its weights as
// columns, C[g][c][i] = W[head(i), g·k + row(i), c] for channel i = head·k + row ([G, k, D],
// FusedCellParams::heads), and, per row, the previous state's head entries spread over the
// channels, h_c[i] = h[head(i)·k + c] ([k, D]), so that W_hh h and the block rows are k
// vector products per gate.
template <typename T>
void spread_heads(const FusedCellParams& p, const T* s, T* spread) {
  const int64_t k = p.k, D = p.D, stride = p.cell == FusedCell::lstm ? 2 : 1;
  for (int64_t first = 0; first < D; first += k) {  // a head's channels first .. first + k − 1
    for (int64_t c = 0; c < k; ++c) {
      const T v = s[stride * (first + c)];
      for (int64_t row = 0; row < k; ++row) spread[c * D + first + row] = v;
    }
  }
}

// Channels d .. d + m − 1 of a multi-head cell's row: their rows of the head blocks
// (FusedPart::blocks) from each gate's coefficient times the heads' weight rows, plus the
// direct terms; zero on reset rows. rows: row(i) = i mod k as numbers [D]; J: the row's blocks.
template <typename T>
void write_block_rows(const FusedCellParams& p, const FusedPoint<Vectorized<T>>& out, const T* rows, int64_t d,
                      int64_t m, bool reset, T* J) {
  using V = Vectorized<T>;
  static constexpr int64_t L = V::size();
  const int64_t k = p.k, D = p.D, G = fused_gates(p.cell);
  const bool lstm = p.cell == FusedCell::lstm;
  const T* C = static_cast<const T*>(p.heads);
  auto load = [m](const T* ptr) { return m == L ? V::loadu(ptr) : V::loadu(ptr, m); };
  const V row = load(rows + d);
  T lanes[4][L];
  for (int64_t c = 0; c < k; ++c) {
    const V on_diagonal = (row == V(static_cast<T>(c))) & V(1);
    V through[4];
    for (int64_t g = 0; g < G; ++g) through[g] = out.coef[g] * load(C + (g * k + c) * D + d);
    if (!lstm) {
      (through[0] + through[1] + through[2] + on_diagonal * out.J[3]).store(lanes[0]);  // + z
      for (int64_t j = 0; j < m; ++j) J[(d + j) * k + c] = reset ? T(0) : lanes[0][j];
      continue;
    }
    // [H, 2k, 2k] over (h_0, c_0, h_1, c_1, ...): a channel's rows 2·row (h') and 2·row + 1 (c').
    const V dc_dh = through[0] + through[1] + through[2];
    (through[3] + out.dh_dc * dc_dh).store(lanes[0]);  // ∂h'/∂h_c
    (on_diagonal * out.dh_dc * out.J[3]).store(lanes[1]);  // ∂h'/∂c_c: (∂h'/∂c') f
    dc_dh.store(lanes[2]);
    (on_diagonal * out.J[3]).store(lanes[3]);  // ∂c'/∂c_c: f
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = d + j, head = i / k, r = i % k;
      T* h_row = J + head * 4 * k * k + 2 * r * 2 * k;
      T* c_row = h_row + 2 * k;
      h_row[2 * c] = reset ? T(0) : lanes[0][j], h_row[2 * c + 1] = reset ? T(0) : lanes[1][j];
      c_row[2 * c] = reset ? T(0) : lanes[2][j], c_row[2 * c + 1] = reset ? T(0) : lanes[3][j];
    }
  }
}

template <typename T>
void rows(const FusedCellParams& p, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  static constexpr int64_t L = V::size();
  const int64_t D = p.D, G = fused_gates(p.cell);
  const bool lstm = p.cell == FusedCell::lstm, jacobian = p.part != FusedPart::none;
  const int64_t S = lstm ? 2 * D : D;
  const T* b = static_cast<const T*>(p.b);
  const T* wd = static_cast<const T*>(p.w);
  // Head cells: the previous state spread over the channels, and row(i) = i mod k.
  std::vector<T> spread(p.heads ? p.k * D : 0), head_rows(p.heads ? D : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(head_rows.size()); ++i) head_rows[i] = static_cast<T>(i % p.k);
  for (int64_t n = begin; n < end; ++n) {
    const T* gi = static_cast<const T*>(p.gi) + n * G * D;
    const T *s, *gh;
    fused_sources<T>(p, n, S, s, gh);
    const T* cur = p.current ? static_cast<const T*>(p.current) + n * S : nullptr;
    T* F = p.F ? static_cast<T*>(p.F) + n * S : nullptr;
    T* R = p.R ? static_cast<T*>(p.R) + n * S : nullptr;
    const int64_t J_row = p.part == FusedPart::block2 ? 4 * D
                          : p.part == FusedPart::blocks ? (lstm ? 4 : 1) * D * p.k
                                                        : S;
    T* J = jacobian ? static_cast<T*>(p.J) + n * J_row : nullptr;
    const bool padded = p.padding && p.padding[n], reset = p.reset && p.reset[n];
    if (p.heads && !gh) spread_heads<T>(p, s, spread.data());
    V max_r(0), max_f(0), square(0);
    for (int64_t d = 0; d < D; d += L) {
      const int64_t m = std::min(L, D - d);
      auto load = [m](const T* ptr) { return m == L ? V::loadu(ptr) : V::loadu(ptr, m); };
      // A pair of vectors over 2m interleaved numbers (the LSTM's (h_i, c_i)).
      auto load_pairs = [m](const T* ptr) {
        const V lo = V::loadu(ptr, std::min(2 * m, L));
        const V hi = 2 * m > L ? V::loadu(ptr + L, 2 * m - L) : V(0);
        return at::vec::deinterleave2(lo, hi);
      };
      auto store_pairs = [m](T* ptr, const V& a, const V& c) {
        const auto [lo, hi] = at::vec::interleave2(a, c);
        lo.store(ptr, std::min(2 * m, L));
        if (2 * m > L) hi.store(ptr + L, 2 * m - L);
      };
      V h, c(0);
      if (lstm) {
        std::tie(h, c) = load_pairs(s + 2 * d);
      } else {
        h = load(s + d);
      }
      V x[4], w[4], hn(0);
      for (int64_t k = 0; k < G; ++k) {
        w[k] = load(wd + k * D + d);
        V hk;
        if (p.diagonal_weights) {
          hk = w[k] * h;
        } else if (gh) {
          hk = load(gh + k * D + d);
        } else {  // a head cell's W_hh h: k products per gate
          const T* C = static_cast<const T*>(p.heads) + k * p.k * D + d;
          hk = V(0);
          for (int64_t c = 0; c < p.k; ++c) hk = hk + load(C + c * D) * load(spread.data() + c * D + d);
        }
        if (b) hk = hk + load(b + k * D + d);
        if (p.cell == FusedCell::gru && k == 2) {
          hn = hk, x[k] = load(gi + k * D + d);
        } else {
          x[k] = load(gi + k * D + d) + hk;
        }
      }
      const FusedPoint<V> out = fused_point<V, VecMath>(p.cell, jacobian, x, hn, h, c, w);
      // Lanes past the row's end are no part of it: kept out of the maxima.
      auto valid = [m](const V& v) { return m == L ? v : V::set(V(0), v, m); };
      // The row's scale: the current states' magnitude, f's without them (cell_fused.h).
      if (lstm) {
        if (F) store_pairs(F + 2 * d, out.F[0], out.F[1]);
        if (!cur) max_f = at::vec::maximum(max_f, at::vec::maximum(valid(out.F[0]).abs(), valid(out.F[1]).abs()));
      } else {
        if (F) out.F[0].store(F + d, m);
        if (!cur) max_f = at::vec::maximum(max_f, valid(out.F[0]).abs());
      }
      if (cur) {
        if (lstm) {
          const auto [ch, cc] = load_pairs(cur + 2 * d);
          const V rh = padded ? V(0) : ch - out.F[0], rc = padded ? V(0) : cc - out.F[1];
          store_pairs(R + 2 * d, rh, rc);
          max_r = at::vec::maximum(max_r, at::vec::maximum(valid(rh).abs(), valid(rc).abs()));
          max_f = at::vec::maximum(max_f, at::vec::maximum(valid(ch).abs(), valid(cc).abs()));
          square = square + valid(rh) * valid(rh) + valid(rc) * valid(rc);
        } else {
          const V c_row = load(cur + d);
          const V r = padded ? V(0) : c_row - out.F[0];
          r.store(R + d, m);
          max_r = at::vec::maximum(max_r, valid(r).abs());
          max_f = at::vec::maximum(max_f, valid(c_row).abs());
          square = square + valid(r) * valid(r);
        }
      }
      if (!jacobian) continue;
      if (p.part == FusedPart::blocks) {
        write_block_rows<T>(p, out, head_rows.data(), d, m, reset, J);
      } else if (p.part == FusedPart::block2) {
        T blocks[4][L];
        for (int k = 0; k < 4; ++k) (reset ? V(0) : out.J[k]).store(blocks[k]);
        for (int64_t j = 0; j < m; ++j) {
          for (int k = 0; k < 4; ++k) J[4 * (d + j) + k] = blocks[k][j];
        }
      } else if (lstm) {
        store_pairs(J + 2 * d, reset ? V(0) : out.J[0], reset ? V(0) : out.J[3]);
      } else {
        (reset ? V(0) : out.J[0]).store(J + d, m);
      }
    }
    if (p.row_residual) static_cast<T*>(p.row_residual)[n] = padded ? T(0) : lane_max(max_r);
    if (p.row_scale) static_cast<T*>(p.row_scale)[n] = padded ? T(0) : lane_max(max_f);
    if (p.row_square) static_cast<T*>(p.row_square)[n] = padded ? T(0) : lane_sum(square);
  }
}

template <typename T>
void update_rows(const NewtonUpdateParams& p, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  static constexpr int64_t L = V::size();
  const int64_t S = p.S;
  const V sign(static_cast<T>(p.sign));
  for (int64_t n = begin; n < end; ++n) {
    const T* s = static_cast<const T*>(p.s) + n * S;
    const T* x = static_cast<const T*>(p.x) + n * S;
    T* next = static_cast<T*>(p.next) + n * S;
    const bool padded = p.padding && p.padding[n], moving = p.moving[n / p.T] && !padded;
    V max_x(0);
    for (int64_t d = 0; d < S; d += L) {
      const int64_t m = std::min(L, S - d);
      const V sv = V::loadu(s + d, m);
      if (padded) {
        sv.store(next + d, m);
        continue;
      }
      const V xv = V::loadu(x + d, m);
      max_x = at::vec::maximum(max_x, (m == L ? xv : V::set(V(0), xv, m)).abs());
      if (moving) {
        const V v = sv + sign * xv;
        V::blendv(V(0), v, (v - v) == V(0)).store(next + d, m);  // v − v is 0 iff v is finite
      } else {
        sv.store(next + d, m);
      }
    }
    static_cast<T*>(p.row_step)[n] = padded ? T(0) : lane_max(max_x);
  }
}

// The loop of a per-channel cell (fused_loop_channel) for the vector of channels [d, d + L)
// of sequence seq, through all its steps.
template <typename T>
void loop_vector(const FusedCellParams& p, int64_t seq, int64_t d) {
  using V = Vectorized<T>;
  static constexpr int64_t L = V::size();
  const int64_t D = p.D, G = fused_gates(p.cell), steps = p.T, m = std::min(L, D - d);
  const bool lstm = p.cell == FusedCell::lstm;
  const int64_t S = lstm ? 2 * D : D;
  const T* b = static_cast<const T*>(p.b);
  const T* wd = static_cast<const T*>(p.w);
  auto load = [m](const T* ptr) { return m == L ? V::loadu(ptr) : V::loadu(ptr, m); };
  auto load_state = [&](const T* row, V& h, V& c) {
    if (!lstm) {
      h = load(row + d), c = V(0);
      return;
    }
    const V lo = V::loadu(row + 2 * d, std::min(2 * m, L));
    const V hi = 2 * m > L ? V::loadu(row + 2 * d + L, 2 * m - L) : V(0);
    std::tie(h, c) = at::vec::deinterleave2(lo, hi);
  };
  V w[4], bias[4];
  for (int64_t k = 0; k < G; ++k) w[k] = load(wd + k * D + d), bias[k] = b ? load(b + k * D + d) : V(0);
  V h, c;
  load_state(static_cast<const T*>(p.first) + seq * S, h, c);
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t n = seq * steps + t;
    if (p.reset && p.reset[n]) load_state(static_cast<const T*>(p.s0) + seq * S, h, c);
    const T* gi = static_cast<const T*>(p.gi) + n * G * D;
    V x[4], hn(0);
    for (int64_t k = 0; k < G; ++k) {
      V hk = w[k] * h;
      if (b) hk = hk + bias[k];
      if (p.cell == FusedCell::gru && k == 2) {
        hn = hk, x[k] = load(gi + k * D + d);
      } else {
        x[k] = load(gi + k * D + d) + hk;
      }
    }
    const FusedPoint<V> out = fused_point<V, VecMath>(p.cell, false, x, hn, h, c, w);
    h = out.F[0], c = lstm ? out.F[1] : V(0);
    T* F = static_cast<T*>(p.F) + n * S;
    if (lstm) {
      const auto [lo, hi] = at::vec::interleave2(h, c);
      lo.store(F + 2 * d, std::min(2 * m, L));
      if (2 * m > L) hi.store(F + 2 * d + L, 2 * m - L);
    } else {
      h.store(F + d, m);
    }
  }
}

// Tasks [begin, end) of the loop (cell_kernels.h: kLoopChannels channels of a sequence each).
template <typename T>
void loop_lanes(const FusedCellParams& p, int64_t begin, int64_t end) {
  static constexpr int64_t L = Vectorized<T>::size();
  static_assert(kLoopChannels % L == 0, "a task holds whole vectors");
  const int64_t groups = (p.D + kLoopChannels - 1) / kLoopChannels;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t seq = task / groups, first = task % groups * kLoopChannels;
    for (int64_t d = first; d < std::min(p.D, first + kLoopChannels); d += L) loop_vector<T>(p, seq, d);
  }
}

}  // namespace

void newton_update_rows(const NewtonUpdateParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::f32: return update_rows<float>(p, begin, end);
    case DType::f64: return update_rows<double>(p, begin, end);
    default: throw std::invalid_argument("pnewton Newton update: only f32 and f64");
  }
}

void fused_loop_lanes(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::f32: return loop_lanes<float>(p, begin, end);
    case DType::f64: return loop_lanes<double>(p, begin, end);
    default: throw std::invalid_argument("pnewton fused loop: only f32 and f64");
  }
}

void fused_cell_rows(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::f32: return rows<float>(p, begin, end);
    case DType::f64: return rows<double>(p, begin, end);
    default: throw std::invalid_argument("pnewton fused cell pass: only f32 and f64");
  }
}

}  // namespace pnewton::cpu::CPU_CAPABILITY
