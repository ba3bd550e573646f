#include "csrc/solver/lengths.h"

namespace pnewton {

at::Tensor checked_lengths(const char* op, const at::Tensor& lengths, int64_t B, int64_t T, at::Device device) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must be a 1-d tensor of the B = ", B,
              " sequence lengths, got shape ", lengths.sizes());
  TORCH_CHECK(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false), op,
              ": lengths must be an integer tensor, got ", lengths.scalar_type());
  if (B > 0) {
    // One host read of two numbers: a length outside [0, T] would index past the batch.
    const auto [lo, hi] = at::aminmax(lengths.to(at::kLong));
    const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
    TORCH_CHECK(min >= 0 && max <= T, op, ": lengths must be in [0, T = ", T, "], got values in [", min, ", ", max,
                "]");
  }
  return lengths.to(device, at::kLong);
}

at::Tensor valid_steps(const at::Tensor& lengths, int64_t T, at::ScalarType dtype) {
  return (at::arange(T, lengths.options()).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(dtype);
}

at::Tensor held_index(const at::Tensor& lengths, int64_t T) {
  return at::minimum(at::arange(T, lengths.options()).unsqueeze(0), lengths.unsqueeze(1) - 1) + 1;
}

at::Tensor gather_steps(const at::Tensor& x, const at::Tensor& index) {
  std::vector<int64_t> shape(index.sizes().begin(), index.sizes().end());
  at::Tensor i = index;
  for (int64_t d = 2; d < x.dim(); ++d) {
    i = i.unsqueeze(-1);
    shape.push_back(x.size(d));
  }
  return x.gather(1, i.expand(shape));
}

at::Tensor hold_past_lengths(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& lengths) {
  return gather_steps(at::cat({s0.unsqueeze(1), states}, 1), held_index(lengths, states.size(1)));
}

std::tuple<at::Tensor, at::Tensor> route_held_gradient(const at::Tensor& grad, const at::Tensor& lengths) {
  const int64_t B = grad.size(0), T = grad.size(1), S = grad.size(2);
  const at::Tensor index = held_index(lengths, T).unsqueeze(-1).expand({B, T, S});
  const at::Tensor full = at::zeros({B, T + 1, S}, grad.options()).scatter_add_(1, index, grad);
  return {full.narrow(1, 1, T), full.select(1, 0)};
}

at::Tensor reversed_index(const at::Tensor& lengths, int64_t T) {
  const at::Tensor t = at::arange(T, lengths.options()).unsqueeze(0);
  const at::Tensor L = lengths.unsqueeze(1);
  return at::where(t < L, L - 1 - t, t);
}

}  // namespace pnewton
