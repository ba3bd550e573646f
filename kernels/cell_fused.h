#pragma once
// The fused per-iteration evaluation of the GRU and LSTM cells (DESIGN §1): once the
// recurrent GEMM has given gh = W_hh h + b_hh for every step, one pass over (gi, gh, s)
// writes f(s) and the part of ∂f/∂s that the method scans (its diagonal, or the 2×2
// (h_i, c_i) blocks of an LSTM), so no gate tensor and no Jacobian beyond what the scan
// reads is materialised. The math is written once here for the CPU loop and the CUDA
// kernel; csrc/solver/cells.cpp keeps the ATen form for dense Jacobians and as reference.
#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"
#include "kernels/scan_params.h"

namespace pnewton {

enum class FusedCell : int { gru, lstm };
// none: f only. diagonal: the diagonal of ∂f/∂s [N, S]. block2: LSTM (h_i, c_i) blocks [N, D, 2, 2].
enum class FusedPart : int { none, diagonal, block2 };

// Rows are steps: gi, gh [N, G·D] (torch.nn gate order), s [N, S] the state each step
// reads (LSTM: (h_i, c_i) interleaved, S = 2D), w [G·D] the diagonal of each D×D gate
// block of W_hh (for per-channel weights, W_hh itself). All contiguous, one dtype.
struct FusedCellParams {
  FusedCell cell = FusedCell::gru;
  FusedPart part = FusedPart::none;
  int64_t N = 0, D = 0;
  const void* gi = nullptr;
  const void* gh = nullptr;
  const void* s = nullptr;
  const void* w = nullptr;
  void* F = nullptr;  // [N, S]
  void* J = nullptr;  // [N, S] or [N, D, 2, 2]; unused for FusedPart::none
};

template <typename T>
PNEWTON_HD T sigmoid_of(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

// Channel d of row n.
template <typename T>
PNEWTON_HD void fused_cell_element(const FusedCellParams& p, int64_t n, int64_t d) {
  using std::tanh;
  const int64_t D = p.D;
  const T* gi = static_cast<const T*>(p.gi) + n * (p.cell == FusedCell::gru ? 3 : 4) * D;
  const T* gh = static_cast<const T*>(p.gh) + n * (p.cell == FusedCell::gru ? 3 : 4) * D;
  const T* w = static_cast<const T*>(p.w);
  T* F = static_cast<T*>(p.F);
  T* J = static_cast<T*>(p.J);
  if (p.cell == FusedCell::gru) {
    const T h = static_cast<const T*>(p.s)[n * D + d];
    const T r = sigmoid_of(gi[d] + gh[d]), z = sigmoid_of(gi[D + d] + gh[D + d]);
    const T hn = gh[2 * D + d], nn = tanh(gi[2 * D + d] + r * hn);
    F[n * D + d] = (T(1) - z) * nn + z * h;
    if (p.part == FusedPart::none) return;
    // ∂h'/∂h_d through r, z, n and the direct z·h term (w: the gate blocks' diagonals).
    const T dn = (T(1) - z) * (T(1) - nn * nn);
    J[n * D + d] = dn * r * w[2 * D + d] + dn * hn * r * (T(1) - r) * w[d] + (h - nn) * z * (T(1) - z) * w[D + d] + z;
    return;
  }
  const T c = static_cast<const T*>(p.s)[(n * D + d) * 2 + 1];  // h enters through gh only
  const T i = sigmoid_of(gi[d] + gh[d]), f = sigmoid_of(gi[D + d] + gh[D + d]);
  const T g = tanh(gi[2 * D + d] + gh[2 * D + d]), o = sigmoid_of(gi[3 * D + d] + gh[3 * D + d]);
  const T c_new = f * c + i * g, tc = tanh(c_new);
  F[(n * D + d) * 2] = o * tc;
  F[(n * D + d) * 2 + 1] = c_new;
  if (p.part == FusedPart::none) return;
  const T dc_dh = g * i * (T(1) - i) * w[d] + c * f * (T(1) - f) * w[D + d] + i * (T(1) - g * g) * w[2 * D + d];
  const T dh_dc = o * (T(1) - tc * tc);
  const T dh_dh = tc * o * (T(1) - o) * w[3 * D + d] + dh_dc * dc_dh;
  if (p.part == FusedPart::diagonal) {
    J[(n * D + d) * 2] = dh_dh;
    J[(n * D + d) * 2 + 1] = f;
  } else {  // [[∂h'/∂h, ∂h'/∂c], [∂c'/∂h, ∂c'/∂c]]
    T* blk = J + (n * D + d) * 4;
    blk[0] = dh_dh, blk[1] = dh_dc * f, blk[2] = dc_dh, blk[3] = f;
  }
}

// CPU: rows [begin, end) (the caller splits rows over threads). f32 and f64.
void fused_cell_cpu(const FusedCellParams& p, DType dtype, int64_t begin, int64_t end);

}  // namespace pnewton
