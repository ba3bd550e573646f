#include "csrc/scan.h"

#include "csrc/checks.h"

#include <string>
#include <vector>

namespace pnewton {

void check_diag_args(const char* op, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                     const char* b_name) {
  check_floating(op, "a", a, 3, "[B, T, D]");
  check_operand(op, b_name, b, a.sym_sizes(), "[B, T, D] like a", a, "a");
  if (x0.has_value()) {
    check_operand(op, "x0", *x0, {a.sym_size(0), a.sym_size(2)}, "[B, D]", a, "a");
  }
}

void check_block_args(const char* op, const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                      const char* b_name) {
  check_floating(op, "A", A, 5, "[B, T, H, k, k]");
  TORCH_CHECK(A.sym_size(3) == A.sym_size(4), op, ": A must hold square blocks [B, T, H, k, k], got shape ",
              A.sym_sizes());
  TORCH_CHECK(A.sym_size(3) >= 1, op, ": A must have a block size k >= 1, got shape ", A.sym_sizes());
  check_operand(op, b_name, b, A.sym_sizes().slice(0, 4), "[B, T, H, k]", A, "A");
  if (x0.has_value()) {
    check_operand(op, "x0", *x0, {A.sym_size(0), A.sym_size(2), A.sym_size(3)}, "[B, H, k]", A, "A");
  }
}

namespace {

// The diagonal scan as the block scan with k = 1 (views, no copies).
at::Tensor as_block_matrix(const at::Tensor& a) { return a.unsqueeze(-1).unsqueeze(-1); }
at::Tensor as_block_vector(const at::Tensor& v) { return v.unsqueeze(-1); }
std::optional<at::Tensor> as_block_vector(const std::optional<at::Tensor>& v) {
  return v.has_value() ? std::optional<at::Tensor>(as_block_vector(*v)) : std::nullopt;
}

at::Tensor run_block_scan(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                          bool reverse, bool transpose, bool shift, ScanRunner run) {
  at::Tensor x = at::empty_symint(b.sym_sizes(), b.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.sym_numel() == 0) return x;
  run(ScanOperands{A, b, x0.has_value() ? *x0 : at::Tensor(), x, reverse, transpose, shift});
  return x;
}

}  // namespace

DType scan_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "pnewton: unsupported dtype ", type);
  }
}

ScanParams scan_params(const ScanOperands& ops) {
  ScanParams p;
  p.B = ops.b.size(0);
  p.T = ops.b.size(1);
  p.H = ops.b.size(2);
  p.k = ops.b.size(3);
  p.A = ops.A.data_ptr();
  for (int i = 0; i < 5; ++i) p.A_stride[i] = ops.A.stride(i);
  p.b = ops.b.data_ptr();
  for (int i = 0; i < 4; ++i) p.b_stride[i] = ops.b.stride(i);
  if (ops.x0.defined()) {
    p.x0 = ops.x0.data_ptr();
    for (int i = 0; i < 3; ++i) p.x0_stride[i] = ops.x0.stride(i);
  }
  p.x = ops.x.data_ptr();
  for (int i = 0; i < 4; ++i) p.x_stride[i] = ops.x.stride(i);
  p.reverse = ops.reverse;
  p.transpose = ops.transpose;
  p.shift = ops.shift;
  return p;
}

void scan_by_doubling(const ScanOperands& ops) {
  const int64_t T = ops.b.size(1);
  // Accumulate in float32 at least, like the kernels.
  const at::ScalarType acc = ops.b.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Elements in processing order: M_pos x + v_pos.
  at::Tensor M = (ops.transpose ? ops.A.transpose(-1, -2) : ops.A).to(acc);
  at::Tensor v = ops.b.to(acc);
  if (ops.reverse) M = M.flip(1), v = v.flip(1);
  // The known state before the first step is folded into it, and the first multiplier
  // becomes zero: then the v part of every inclusive prefix is the state x_pos itself.
  // Shifted, each step multiplies by its predecessor's matrix (the first by zero) and
  // x0 is not read.
  if (ops.x0.defined() && !ops.shift) {
    const at::Tensor first = v.narrow(1, 0, 1) +
                             at::matmul(M.narrow(1, 0, 1), ops.x0.to(acc).unsqueeze(1).unsqueeze(-1)).squeeze(-1);
    v = at::cat({first, v.narrow(1, 1, T - 1)}, 1);
  }
  M = at::cat({at::zeros_like(M.narrow(1, 0, 1)), M.narrow(1, ops.shift ? 0 : 1, T - 1)}, 1);
  for (int64_t d = 1; d < T; d *= 2) {
    const int64_t n = T - d;
    const at::Tensor M_later = M.narrow(1, d, n);
    const at::Tensor v2 = at::matmul(M_later, v.narrow(1, 0, n).unsqueeze(-1)).squeeze(-1) + v.narrow(1, d, n);
    const bool last = 2 * d >= T;
    if (!last) M = at::cat({M.narrow(1, 0, d), at::matmul(M_later, M.narrow(1, 0, n))}, 1);
    v = at::cat({v.narrow(1, 0, d), v2}, 1);
  }
  ops.x.copy_(ops.reverse ? v.flip(1) : v);
}

at::Tensor scan_diag_impl(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                          bool reverse, ScanRunner run) {
  check_diag_args("pnewton.scan_diag", a, b, x0);
  return run_block_scan(as_block_matrix(a), as_block_vector(b), as_block_vector(x0), reverse, false, false, run)
      .squeeze(-1);
}

at::Tensor scan_block_impl(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& x0,
                           bool reverse, bool transpose, ScanRunner run) {
  check_block_args("pnewton.scan_block", A, b, x0);
  return run_block_scan(A, b, x0, reverse, transpose, false, run);
}

void check_diag_backward_args(const char* op, const at::Tensor& grad_x, const at::Tensor& a, const at::Tensor& x,
                              const std::optional<at::Tensor>& x0) {
  check_diag_args(op, a, x, x0, "x");
  check_operand(op, "grad_x", grad_x, x.sym_sizes(), "[B, T, D] like x", a, "a");
}

void check_block_backward_args(const char* op, const at::Tensor& grad_x, const at::Tensor& A, const at::Tensor& x,
                               const std::optional<at::Tensor>& x0) {
  check_block_args(op, A, x, x0, "x");
  check_operand(op, "grad_x", grad_x, x.sym_sizes(), "[B, T, H, k] like x", A, "A");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_gradients(const at::Tensor& lambda, const at::Tensor& A,
                                                              const at::Tensor& x,
                                                              const std::optional<at::Tensor>& x0, bool reverse,
                                                              bool transpose) {
  const c10::SymInt T = x.sym_size(1);
  at::Tensor initial =
      x0.has_value() ? *x0 : at::zeros_symint({x.sym_size(0), x.sym_size(2), x.sym_size(3)}, x.options());
  if (T == 0) return {at::zeros_like(A), lambda, at::zeros_like(initial)};

  // Step t read the state x_prev_t (x_{t-1} forward, x_{t+1} reverse; x0 at the edge).
  const at::Tensor first_state = initial.unsqueeze(1);
  const at::Tensor x_prev = reverse ? at::cat({x.narrow_symint(1, 1, T - 1), first_state}, 1)
                                    : at::cat({first_state, x.narrow_symint(1, 0, T - 1)}, 1);
  const int64_t first = reverse ? -1 : 0;
  // x_t = C_t x_prev + b_t with C = A (or Aᵀ): dL/dA = λ x_prevᵀ (or x_prev λᵀ).
  at::Tensor grad_A = transpose ? x_prev.unsqueeze(-1) * lambda.unsqueeze(-2)
                                : lambda.unsqueeze(-1) * x_prev.unsqueeze(-2);
  const at::Tensor A_first = A.select(1, first), lambda_first = lambda.select(1, first);
  at::Tensor grad_x0 = transpose ? (A_first * lambda_first.unsqueeze(-2)).sum(-1)
                                 : (A_first * lambda_first.unsqueeze(-1)).sum(-2);
  return {grad_A, lambda, grad_x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_block_backward_impl(const at::Tensor& grad_x,
                                                                        const at::Tensor& A, const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& x0,
                                                                        bool reverse, bool transpose, ScanRunner run) {
  check_block_backward_args("pnewton.scan_block_backward", grad_x, A, x, x0);
  // The adjoint λ_t = g_t + A_{t+1}ᵀ λ_{t+1} (forward case): the same scan, the other way,
  // transposed, each step multiplied by its predecessor's matrix.
  const at::Tensor lambda = run_block_scan(A, grad_x, std::nullopt, !reverse, !transpose, true, run);
  return scan_gradients(lambda, A, x, x0, reverse, transpose);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_diag_backward_impl(const at::Tensor& grad_x,
                                                                       const at::Tensor& a, const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& x0,
                                                                       bool reverse, ScanRunner run) {
  check_diag_backward_args("pnewton.scan_diag_backward", grad_x, a, x, x0);
  auto [grad_A, grad_b, grad_x0] = scan_block_backward_impl(as_block_vector(grad_x), as_block_matrix(a),
                                                            as_block_vector(x), as_block_vector(x0), reverse,
                                                            false, run);
  return {grad_A.squeeze(-1).squeeze(-1), grad_b.squeeze(-1), grad_x0.squeeze(-1)};
}

}  // namespace pnewton
