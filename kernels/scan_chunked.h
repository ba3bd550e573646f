#pragma once
// The chunked scan of the CUDA backend (any k <= kMaxCudaBlock), written once for the
// kernels (scan_cuda.cu) and for their CPU mirror (scan_chunked_cpu), which runs every
// thread of each phase in turn so that CI proves the decomposition without a GPU.
//
// Time is cut into n_chunks chunks per lane (b, h), and three phases run:
//   1. aggregate: the affine map (M, v) of every chunk but the last;
//   2. carry: one thread per lane composes them in order, giving the state entering each
//      chunk;
//   3. rescan: every chunk steps that state through its steps, writing x.
// Phase 1 has two forms. Up to kMaxRegisterBlock one thread folds a chunk's whole
// element, k² + k numbers in registers (and k² + k more of scratch). Beyond it that
// spills to local memory (k = 32 cost ~0.3 s on an H200), so k + 1 threads share a chunk:
// thread j < k carries column j of M (e_j stepped by x ↦ A_t x) and thread k carries v
// (0 stepped by x ↦ A_t x + b_t), k numbers each. The steps read the same A_t, so the
// column threads of a warp read each coefficient once from memory and the rest from L1.
#include <cstdint>

#include "kernels/host_device.h"
#include "kernels/scan_element.h"
#include "kernels/scan_params.h"

namespace pnewton {

// The largest block whose chunk aggregate one thread folds in registers, and the largest
// block the chunked scan takes (a column thread holds 2k numbers).
constexpr int kMaxRegisterBlock = 8;
constexpr int kMaxChunkedBlock = 16;

// Threads that fold one chunk's aggregate.
PNEWTON_HD int64_t chunk_threads(int64_t k) { return k > kMaxRegisterBlock ? k + 1 : 1; }

// The block size of an instantiation: K itself up to kMaxRegisterBlock; beyond, K is a
// capacity and one instantiation serves every k <= K (loops run to K and stop at k, so
// the register arrays keep constant indices).
template <int K>
PNEWTON_HD int chunk_block(int64_t k) {
  return K <= kMaxRegisterBlock ? K : static_cast<int>(k);
}

// next = A y + v for a block of k <= K (A null: a zero multiplier; v null: no inputs).
template <int K, typename acc_t, typename m_t, typename v_t>
PNEWTON_HD void chunk_step(int k, const StridedMatrix<m_t>* A, const acc_t* y, const v_t* v, int64_t v_stride,
                           acc_t* next) {
  PNEWTON_UNROLL
  for (int i = 0; i < K; ++i) {
    if (i >= k) break;
    acc_t acc = v ? static_cast<acc_t>(v[i * v_stride]) : acc_t(0);
    PNEWTON_UNROLL
    for (int j = 0; j < K; ++j) {
      if (j >= k || !A) break;
      acc += static_cast<acc_t>((*A)(i, j)) * y[j];
    }
    next[i] = acc;
  }
}

// Positions [*pos0, *pos1) of chunk c.
PNEWTON_HD void chunk_positions(const ScanParams& p, int64_t n_chunks, int64_t c, int64_t* pos0, int64_t* pos1) {
  const int64_t len = (p.T + n_chunks - 1) / n_chunks;
  *pos0 = c * len < p.T ? c * len : p.T;
  *pos1 = (c + 1) * len < p.T ? (c + 1) * len : p.T;
}

// Scratch slot of (b, c, h): M [B, chunks, H, k, k], v and carry [B, chunks, H, k].
PNEWTON_HD int64_t chunk_slot(const ScanParams& p, int64_t n_chunks, int64_t b, int64_t c, int64_t h) {
  return (b * n_chunks + c) * p.H + h;
}

// Phase 1, one thread per chunk (K <= kMaxRegisterBlock): (M, v) of chunk c of lane (b, h).
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void chunk_aggregate(const ScanParams& p, int64_t n_chunks, int64_t b, int64_t c, int64_t h, acc_t* M_out,
                                acc_t* v_out) {
  static_assert(K <= kMaxRegisterBlock, "larger blocks fold by columns: chunk_aggregate_column");
  acc_t M[K * K], v[K], tmp[K * K + K];
  set_identity<K>(K, M, v);
  int64_t pos0, pos1;
  chunk_positions(p, n_chunks, c, &pos0, &pos1);
  for (int64_t pos = pos0; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos), ta = coefficient_time(p, pos);
    const scalar_t* in = input_at<scalar_t>(p, b, t, h);
    if (ta < 0) {
      PNEWTON_UNROLL
      for (int i = 0; i < K * K; ++i) M[i] = 0;
      PNEWTON_UNROLL
      for (int i = 0; i < K; ++i) v[i] = static_cast<acc_t>(in[i * p.b_stride[3]]);
    } else {
      fold<K>(K, coefficient<scalar_t>(p, b, ta, h), in, p.b_stride[3], M, v, tmp);
    }
  }
  const int64_t slot = chunk_slot(p, n_chunks, b, c, h);
  PNEWTON_UNROLL
  for (int i = 0; i < K * K; ++i) M_out[slot * K * K + i] = M[i];
  PNEWTON_UNROLL
  for (int i = 0; i < K; ++i) v_out[slot * K + i] = v[i];
}

// Phase 1, k + 1 threads per chunk (k <= K): thread `column` < k writes column `column` of
// chunk c's M, thread k its v.
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void chunk_aggregate_column(const ScanParams& p, int64_t n_chunks, int64_t b, int64_t c, int64_t h,
                                       int column, acc_t* M_out, acc_t* v_out) {
  const int k = chunk_block<K>(p.k);
  const bool affine = column == k;  // v: the inputs enter
  acc_t y[K], next[K];
  PNEWTON_UNROLL
  for (int i = 0; i < K; ++i) y[i] = !affine && i == column ? acc_t(1) : acc_t(0);
  int64_t pos0, pos1;
  chunk_positions(p, n_chunks, c, &pos0, &pos1);
  for (int64_t pos = pos0; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos), ta = coefficient_time(p, pos);
    const scalar_t* in = input_at<scalar_t>(p, b, t, h);
    const StridedMatrix<scalar_t> A = coefficient<scalar_t>(p, b, ta < 0 ? 0 : ta, h);
    chunk_step<K>(k, ta < 0 ? nullptr : &A, y, affine ? in : nullptr, p.b_stride[3], next);
    PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) {
      if (i >= k) break;
      y[i] = next[i];
    }
  }
  const int64_t slot = chunk_slot(p, n_chunks, b, c, h);
  PNEWTON_UNROLL
  for (int i = 0; i < K; ++i) {
    if (i >= k) break;
    if (affine) {
      v_out[slot * k + i] = y[i];
    } else {
      M_out[slot * k * k + i * k + column] = y[i];
    }
  }
}

// Phase 2, one thread per lane: the state entering every chunk of lane (b, h).
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void chunk_carry(const ScanParams& p, int64_t n_chunks, int64_t b, int64_t h, const acc_t* M,
                            const acc_t* v, acc_t* carry) {
  const int k = chunk_block<K>(p.k);
  acc_t s[K], next[K];
  load_initial_state<0, acc_t, scalar_t>(p, b, h, s);
  for (int64_t c = 0;; ++c) {
    const int64_t slot = chunk_slot(p, n_chunks, b, c, h);
    PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) {
      if (i >= k) break;
      carry[slot * k + i] = s[i];
    }
    if (c + 1 == n_chunks) break;
    const StridedMatrix<acc_t> A{M + slot * k * k, k, 1};
    chunk_step<K>(k, &A, s, v + slot * k, 1, next);
    PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) {
      if (i >= k) break;
      s[i] = next[i];
    }
  }
}

// Phase 3, one thread per chunk: chunk c of lane (b, h) stepped from the state entering it.
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void chunk_rescan(const ScanParams& p, int64_t n_chunks, int64_t b, int64_t c, int64_t h,
                             const acc_t* carry) {
  const int k = chunk_block<K>(p.k);
  acc_t s[K], next[K];
  const int64_t slot = chunk_slot(p, n_chunks, b, c, h);
  PNEWTON_UNROLL
  for (int i = 0; i < K; ++i) s[i] = i < k ? carry[slot * k + i] : acc_t(0);
  int64_t pos0, pos1;
  chunk_positions(p, n_chunks, c, &pos0, &pos1);
  for (int64_t pos = pos0; pos < pos1; ++pos) {
    const int64_t t = time_at(p, pos), ta = coefficient_time(p, pos);
    const scalar_t* in = input_at<scalar_t>(p, b, t, h);
    const StridedMatrix<scalar_t> A = coefficient<scalar_t>(p, b, ta < 0 ? 0 : ta, h);
    chunk_step<K>(k, ta < 0 ? nullptr : &A, s, in, p.b_stride[3], next);
    scalar_t* out = output_at<scalar_t>(p, b, t, h);
    PNEWTON_UNROLL
    for (int i = 0; i < K; ++i) {
      if (i >= k) break;
      s[i] = next[i];
      out[i * p.x_stride[3]] = static_cast<scalar_t>(next[i]);
    }
  }
}

// The CPU mirror: phase by phase, every thread of a phase in turn (the last chunk's
// aggregate is never needed, and never formed). k <= kMaxChunkedBlock; f32 and f64 only.
void scan_chunked_cpu(const ScanParams& p, DType dtype, int64_t n_chunks);

}  // namespace pnewton
