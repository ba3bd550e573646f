#pragma once
// The scan element of every parallel Newton method: the affine map x ↦ M x + v on one
// k-vector (k = 1 is the diagonal scan). Its combine is written once here and used
// unchanged by the CPU loops, the CPU chunked scan and the CUDA kernels.
//
// Operand order: compose(earlier, later) applies `earlier` first, so
//   later ∘ earlier = (M_l M_e, M_l v_e + v_l).
// It is associative but not commutative; swapping the operands is the classic bug.
#include <cstdint>

#include "kernels/host_device.h"

namespace pnewton {

// Block size: compile-time K > 0, or the runtime k when K == 0.
template <int K>
PNEWTON_HD int block_size(int64_t k) {
  return K > 0 ? K : static_cast<int>(k);
}

// A matrix in memory with element strides; C(i, j) = ptr[i * row + j * col].
// Swapping row and col reads the transpose without moving data.
template <typename T>
struct StridedMatrix {
  const T* ptr;
  int64_t row, col;
  PNEWTON_HD T operator()(int i, int j) const { return ptr[i * row + j * col]; }
};

// y = C x + v for one block. y must not alias x.
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void affine_apply(int64_t k_rt, StridedMatrix<scalar_t> C, const acc_t* x,
                             const scalar_t* v, int64_t v_stride, acc_t* y) {
  const int k = block_size<K>(k_rt);
  for (int i = 0; i < k; ++i) {
    acc_t acc = static_cast<acc_t>(v[i * v_stride]);
    for (int j = 0; j < k; ++j) acc += static_cast<acc_t>(C(i, j)) * x[j];
    y[i] = acc;
  }
}

// (M_out, v_out) = later ∘ earlier, with the later element read through strides.
// The outputs must not alias the later element; they may alias the earlier one only
// through the separate scratch `tmp` (k*k + k), which is what fold() below does.
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void compose(int64_t k_rt, const acc_t* M_earlier, const acc_t* v_earlier,
                        StridedMatrix<scalar_t> M_later, const scalar_t* v_later,
                        int64_t v_later_stride, acc_t* M_out, acc_t* v_out) {
  const int k = block_size<K>(k_rt);
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) {
      acc_t acc = 0;
      for (int l = 0; l < k; ++l) acc += static_cast<acc_t>(M_later(i, l)) * M_earlier[l * k + j];
      M_out[i * k + j] = acc;
    }
  }
  affine_apply<K>(k_rt, M_later, v_earlier, v_later, v_later_stride, v_out);
}

// (M, v) ← the identity map x ↦ x: the aggregate of no steps.
template <int K, typename acc_t>
PNEWTON_HD void set_identity(int64_t k_rt, acc_t* M, acc_t* v) {
  const int k = block_size<K>(k_rt);
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) M[i * k + j] = i == j ? acc_t(1) : acc_t(0);
    v[i] = 0;
  }
}

// aggregate ← step ∘ aggregate, in place, using tmp (k*k + k values).
template <int K, typename acc_t, typename scalar_t>
PNEWTON_HD void fold(int64_t k_rt, StridedMatrix<scalar_t> C, const scalar_t* v, int64_t v_stride,
                     acc_t* M, acc_t* vec, acc_t* tmp) {
  const int k = block_size<K>(k_rt);
  compose<K>(k_rt, M, vec, C, v, v_stride, tmp, tmp + k * k);
  for (int i = 0; i < k * k; ++i) M[i] = tmp[i];
  for (int i = 0; i < k; ++i) vec[i] = tmp[k * k + i];
}

// Value type of a fixed-size element, for tests and for carries held in registers.
template <typename acc_t, int K>
struct Affine {
  acc_t M[K * K];
  acc_t v[K];

  PNEWTON_HD static Affine identity() {
    Affine e;
    set_identity<K>(K, e.M, e.v);
    return e;
  }
};

template <typename acc_t, int K>
PNEWTON_HD Affine<acc_t, K> compose(const Affine<acc_t, K>& earlier, const Affine<acc_t, K>& later) {
  Affine<acc_t, K> out;
  compose<K>(K, earlier.M, earlier.v, StridedMatrix<acc_t>{later.M, K, 1}, later.v, 1, out.M, out.v);
  return out;
}

template <typename acc_t, int K>
PNEWTON_HD void apply(const Affine<acc_t, K>& e, const acc_t* x, acc_t* y) {
  affine_apply<K>(K, StridedMatrix<acc_t>{e.M, K, 1}, x, e.v, 1, y);
}

}  // namespace pnewton
