#pragma once
// The single-pass scan of the CUDA backend (decoupled look-back, Merrill & Garland 2016),
// written once for the kernel (scan_cuda.cu) and for its CPU mirror (scan_single_pass_cpu),
// which runs the same tiles, slices and look-back in a serial schedule so that CI proves
// the decomposition without a GPU.
//
// Lanes (b, h) go in groups of C channels, processing positions in tiles of L = P·S steps.
// One tile is one thread block of C·P threads; thread (c, q) owns the S steps
// [q·S, (q+1)·S) of channel c and keeps them in registers, so every input is read once
// and every output written once:
//   1. load and fold: the thread's aggregate (M, v);
//   2. slice scan: Hillis–Steele over q in shared memory, giving each slice the
//      composition of the slices before it, and the tile's aggregate;
//   3. look-back (lane c of the first threads): publish the tile's aggregate, walk back
//      over the predecessors' flags until one has published the state after it, compose,
//      publish the state after this tile;
//   4. rescan: from the state entering its slice, each thread writes its S outputs.
// Tiles take their index from a counter in launch order, so every predecessor a
// look-back waits for has started: the wait always ends.
#include <cstdint>
#include <cstdlib>

#include "kernels/host_device.h"
#include "kernels/scan_element.h"
#include "kernels/scan_params.h"

namespace pnewton {

constexpr int kSinglePassThreads = 256;

// Block sizes with a single-pass kernel; larger blocks use the three-phase chunked scan.
PNEWTON_HD bool single_pass_supported(int64_t k) { return k == 1 || k == 2; }

// Steps per thread, held in registers between the fold and the rescan: the default, and
// the other instantiated choices (PNEWTON_SINGLE_PASS_STEPS, for tuning).
PNEWTON_HD constexpr int default_single_pass_steps(int64_t k) { return k == 1 ? 16 : 8; }
inline bool single_pass_steps_supported(int64_t k, int steps) {
  return k == 1 ? (steps == 8 || steps == 16 || steps == 32) : (steps == 4 || steps == 8);
}

struct SinglePassGeometry {
  int64_t C = 1, P = 1, S = 1, L = 1;  // channels, slices, steps per slice, steps per tile
  int64_t head_groups = 1, groups = 1, tiles = 1;

  PNEWTON_HD int64_t flag_index(int64_t g, int64_t j, int64_t c) const { return (g * tiles + j) * C + c; }
};

inline SinglePassGeometry single_pass_geometry(const ScanParams& p, int steps) {
  SinglePassGeometry g;
  while (g.C < 32 && g.C < p.H) g.C *= 2;  // a warp spans 32 channels where there are
  g.P = kSinglePassThreads / g.C;
  g.S = steps;
  g.L = g.P * g.S;
  g.head_groups = (p.H + g.C - 1) / g.C;
  g.groups = p.B * g.head_groups;
  g.tiles = (p.T + g.L - 1) / g.L;
  return g;
}

// What each (group, tile, channel) has published for its successors.
enum SinglePassFlag : int { kNothing = 0, kAggregate = 1, kInclusive = 2 };

template <typename acc_t>
struct SinglePassStatus {
  int* flag;     // [groups, tiles, C]
  acc_t* M;      // [groups, tiles, C, k, k]: the tile's aggregate
  acc_t* v;      // [groups, tiles, C, k]
  acc_t* state;  // [groups, tiles, C, k]: the state after the tile
};

// ---- memory ordering between thread blocks (plain accesses in the serial CPU mirror) ----

PNEWTON_HD void publication_fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

PNEWTON_HD void write_flag(int* flag, int value) {
#if defined(__CUDA_ARCH__)
  atomicExch(flag, value);
#else
  *flag = value;
#endif
}

// A value (or flag) another block published: read past the (incoherent) L1 cache.
template <typename T>
PNEWTON_HD T read_published(const T* x) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const volatile T*>(x);
#else
  return *x;
#endif
}

// ---- one thread's slice -------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int K, int S>
struct SinglePassSlice {
  scalar_t A[S][K * K];  // the effective multiplier of each step (transposed, shifted, or 0)
  scalar_t b[S][K];
  int n = 0;             // steps of the slice inside [0, T)

  PNEWTON_HD void load(const ScanParams& p, int64_t bi, int64_t h, int64_t pos0) {
    const int64_t left = p.T - pos0;
    n = left <= 0 ? 0 : (left < S ? static_cast<int>(left) : S);
PNEWTON_UNROLL
    for (int s = 0; s < S; ++s) {
      if (s >= n) continue;
      const int64_t pos = pos0 + s, t = time_at(p, pos), ta = coefficient_time(p, pos);
      const scalar_t* in = input_at<scalar_t>(p, bi, t, h);
PNEWTON_UNROLL
      for (int i = 0; i < K; ++i) b[s][i] = in[i * p.b_stride[3]];
      if (ta >= 0) {
        const StridedMatrix<scalar_t> C = coefficient<scalar_t>(p, bi, ta, h);
PNEWTON_UNROLL
        for (int i = 0; i < K; ++i) {
PNEWTON_UNROLL
          for (int j = 0; j < K; ++j) A[s][i * K + j] = C(i, j);
        }
      } else {
PNEWTON_UNROLL
        for (int i = 0; i < K * K; ++i) A[s][i] = scalar_t(0.0f);
      }
    }
  }

  // (M, v) ← the composition of the slice's steps.
  PNEWTON_HD void aggregate(acc_t* M, acc_t* v) const {
    acc_t tmp[K * K + K];
    set_identity<K>(K, M, v);
PNEWTON_UNROLL
    for (int s = 0; s < S; ++s) {
      if (s < n) fold<K>(K, StridedMatrix<scalar_t>{A[s], K, 1}, b[s], 1, M, v, tmp);
    }
  }

  // Steps the state through the slice from `state`, writing x.
  PNEWTON_HD void rescan(const ScanParams& p, int64_t bi, int64_t h, int64_t pos0, const acc_t* state) const {
    acc_t s_cur[K], s_next[K];
PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) s_cur[i] = state[i];
PNEWTON_UNROLL
    for (int s = 0; s < S; ++s) {
      if (s >= n) continue;
      affine_apply<K>(K, StridedMatrix<scalar_t>{A[s], K, 1}, s_cur, b[s], 1, s_next);
      scalar_t* out = output_at<scalar_t>(p, bi, time_at(p, pos0 + s), h);
PNEWTON_UNROLL
      for (int i = 0; i < K; ++i) {
        s_cur[i] = s_next[i];
        out[i * p.x_stride[3]] = static_cast<scalar_t>(s_next[i]);
      }
    }
  }
};

// ---- the block's slice scan and the look-back -----------------------------------------------

// Elements (M, v) of thread (c, q) at (q·C + c)·E in shared memory, E = K·K + K.
template <int K>
PNEWTON_HD constexpr int element_size() {
  return K * K + K;
}

// One Hillis–Steele round over the slices: out[q] = in[q] ∘ in[q − d] for q ≥ d, else in[q].
template <int K, typename acc_t>
PNEWTON_HD void slice_scan_round(const acc_t* in, acc_t* out, int64_t C, int64_t q, int64_t c, int64_t d) {
  constexpr int E = element_size<K>();
  const acc_t* self = in + (q * C + c) * E;
  acc_t* dst = out + (q * C + c) * E;
  if (q >= d) {
    const acc_t* earlier = in + ((q - d) * C + c) * E;
    compose<K>(K, earlier, earlier + K * K, StridedMatrix<acc_t>{self, K, 1}, self + K * K, 1, dst, dst + K * K);
  } else {
PNEWTON_UNROLL
    for (int i = 0; i < E; ++i) dst[i] = self[i];
  }
}

// Lane c of tile (g, j), whose aggregate is (M_tile, v_tile): the state entering the tile
// (`initial` for the first tile), found by looking back over the predecessors. Publishes
// the aggregate first and, when publish_inclusive, the state after the tile at the end.
template <int K, typename acc_t>
PNEWTON_HD void look_back(const SinglePassStatus<acc_t>& st, const SinglePassGeometry& geo, int64_t g, int64_t j,
                          int64_t c, const acc_t* M_tile, const acc_t* v_tile, const acc_t* initial, acc_t* entering,
                          bool publish_inclusive) {
  const int64_t self = geo.flag_index(g, j, c);
  if (j == 0) {
PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) entering[i] = initial[i];
  } else {
PNEWTON_UNROLL
    for (int i = 0; i < K * K; ++i) st.M[self * K * K + i] = M_tile[i];
PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) st.v[self * K + i] = v_tile[i];
    publication_fence();
    write_flag(&st.flag[self], kAggregate);
    // R: the composition of the aggregates between the published state and this tile.
    acc_t R[K * K + K], next[K * K + K];
    set_identity<K>(K, R, R + K * K);
    for (int64_t jj = j - 1;; --jj) {
      const int64_t other = geo.flag_index(g, jj, c);
      int flag;
      while ((flag = read_published(&st.flag[other])) == kNothing) {
#if !defined(__CUDA_ARCH__)
        std::abort();  // the serial mirror runs predecessors first: a bug, not a wait
#endif
      }
      publication_fence();
      if (flag == kInclusive) {
        acc_t x[K];
PNEWTON_UNROLL
        for (int i = 0; i < K; ++i) x[i] = read_published(&st.state[other * K + i]);
        affine_apply<K>(K, StridedMatrix<acc_t>{R, K, 1}, x, R + K * K, 1, entering);
        break;
      }
      acc_t M_other[K * K], v_other[K];
PNEWTON_UNROLL
      for (int i = 0; i < K * K; ++i) M_other[i] = read_published(&st.M[other * K * K + i]);
PNEWTON_UNROLL
      for (int i = 0; i < K; ++i) v_other[i] = read_published(&st.v[other * K + i]);
      compose<K>(K, M_other, v_other, StridedMatrix<acc_t>{R, K, 1}, R + K * K, 1, next, next + K * K);
PNEWTON_UNROLL
      for (int i = 0; i < K * K + K; ++i) R[i] = next[i];
    }
  }
  if (publish_inclusive || j == 0) {
    affine_apply<K>(K, StridedMatrix<acc_t>{M_tile, K, 1}, entering, v_tile, 1, &st.state[self * K]);
    publication_fence();
    write_flag(&st.flag[self], kInclusive);
  }
}

// The state entering slice q of a tile: the composition of the slices before it (the
// inclusive prefix of slice q − 1) applied to the state entering the tile.
template <int K, typename acc_t>
PNEWTON_HD void slice_entering_state(const acc_t* prefix, int64_t C, int64_t q, int64_t c, const acc_t* entering,
                                     acc_t* state) {
  constexpr int E = element_size<K>();
  if (q == 0) {
PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) state[i] = entering[i];
    return;
  }
  const acc_t* before = prefix + ((q - 1) * C + c) * E;
  affine_apply<K>(K, StridedMatrix<acc_t>{before, K, 1}, entering, before + K * K, 1, state);
}

// The CPU mirror: the kernel's tiles run one after another in index order (a schedule
// the GPU may also take), each tile's threads phase by phase. publish_every > 1 withholds
// the state after every tile whose index is not a multiple of it, so that look-backs
// compose aggregates as they do when predecessors are still running. steps: 0 for the
// default, else one single_pass_steps_supported. f32 and f64 only.
void scan_single_pass_cpu(const ScanParams& p, DType dtype, int64_t publish_every = 1, int steps = 0);

}  // namespace pnewton
