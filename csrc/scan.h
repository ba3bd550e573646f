#pragma once
// Device-independent glue of the scan ops: argument checks, the diagonal-as-block view,
// the backward from the adjoint scan. Each device supplies one ScanRunner.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels/scan_params.h"

namespace pnewton {

// Tensors of one scan in block form: A [B, T, H, k, k], b and x [B, T, H, k],
// x0 [B, H, k] or undefined (zeros). x is written.
struct ScanOperands {
  at::Tensor A, b, x0, x;
  bool reverse = false, transpose = false, shift = false;
};

using ScanRunner = void (*)(const ScanOperands&);

// The scan by recursive doubling (Hillis–Steele) over ATen batched matmuls, on any device:
// O(T log T · k³) work in log₂T launches. For block sizes too large for a kernel's registers.
void scan_by_doubling(const ScanOperands& ops);

ScanParams scan_params(const ScanOperands& ops);
DType scan_dtype(at::ScalarType type);

// The checks of the scan ops' arguments (csrc/checks.h), shared by every kernel and the meta ones.
// b_name: what the op calls its [B, T, ...] operand (b; x in the backward ops).
void check_diag_args(const char* op, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                     const char* b_name = "b");
void check_block_args(const char* op, const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                      const char* b_name = "b");
void check_diag_backward_args(const char* op, const at::Tensor& grad_x, const at::Tensor& a, const at::Tensor& x,
                              const std::optional<at::Tensor>& x0);
void check_block_backward_args(const char* op, const at::Tensor& grad_x, const at::Tensor& A, const at::Tensor& x,
                               const std::optional<at::Tensor>& x0);

// (grad_A, grad_b, grad_x0) of a block scan from its adjoint λ (= grad_b), however λ was
// solved: the kernels' shifted scan, or the differentiable scan ops (double backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_gradients(const at::Tensor& lambda, const at::Tensor& A,
                                                              const at::Tensor& x,
                                                              const std::optional<at::Tensor>& x0, bool reverse,
                                                              bool transpose);

at::Tensor scan_diag_impl(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                          bool reverse, ScanRunner run);
at::Tensor scan_block_impl(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                           bool reverse, bool transpose, ScanRunner run);
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_diag_backward_impl(const at::Tensor& grad_x,
                                                                       const at::Tensor& a, const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& x0,
                                                                       bool reverse, ScanRunner run);
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_block_backward_impl(const at::Tensor& grad_x,
                                                                        const at::Tensor& A, const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& x0,
                                                                        bool reverse, bool transpose, ScanRunner run);

// Registers the four scan kernels of one dispatch key, all running on `run` (the meta
// kernels: a runner that computes nothing, so they check and shape exactly as the others).
template <ScanRunner run>
void register_scan_kernels(torch::Library& m) {
  m.impl("scan_diag", [](const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                         bool reverse) { return scan_diag_impl(a, b, x0, reverse, run); });
  m.impl("scan_block", [](const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                          bool reverse, bool transpose) { return scan_block_impl(A, b, x0, reverse, transpose, run); });
  m.impl("scan_diag_backward", [](const at::Tensor& grad_x, const at::Tensor& a, const at::Tensor& x,
                                  const std::optional<at::Tensor>& x0, bool reverse) {
    return scan_diag_backward_impl(grad_x, a, x, x0, reverse, run);
  });
  m.impl("scan_block_backward", [](const at::Tensor& grad_x, const at::Tensor& A, const at::Tensor& x,
                                   const std::optional<at::Tensor>& x0, bool reverse, bool transpose) {
    return scan_block_backward_impl(grad_x, A, x, x0, reverse, transpose, run);
  });
}

}  // namespace pnewton
