// Every pnewton schema, in one place. Kernels live one folder per dispatch key:
// csrc/cpu, csrc/cuda, csrc/autograd; fake (meta) kernels live in torch_ops/_fake.py.
#include <torch/library.h>

TORCH_LIBRARY(pnewton, m) {
  // x_t = a_t ⊙ x_{t-1} + b_t over [B, T, D] (reverse: x_t = a_t ⊙ x_{t+1} + b_t).
  m.def("scan_diag(Tensor a, Tensor b, Tensor? x0=None, bool reverse=False) -> Tensor");
  // x_t = A_t x_{t-1} + b_t per block: A [B, T, H, k, k], b [B, T, H, k] (A_tᵀ if transpose).
  m.def("scan_block(Tensor A, Tensor b, Tensor? x0=None, bool reverse=False, bool transpose=False) -> Tensor");
  // Backward passes: the adjoint is the transposed scan run the other way, one step shifted.
  // They return (grad_a, grad_b, grad_x0); grad_x0 is returned even when x0 was None.
  m.def("scan_diag_backward(Tensor grad_x, Tensor a, Tensor x, Tensor? x0, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "scan_block_backward(Tensor grad_x, Tensor A, Tensor x, Tensor? x0, bool reverse, bool transpose) -> "
      "(Tensor, Tensor, Tensor)");
}
