#include "csrc/solver/segments.h"

#include <limits>

namespace pnewton {

at::Tensor lengths_on(const char* op, const at::Tensor& lengths, const c10::SymInt& B, at::Device device) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.sym_size(0) == B, op, ": lengths must be a 1-d tensor of the B = ", B,
              " sequence lengths, got shape ", lengths.sym_sizes());
  TORCH_CHECK(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false), op,
              ": lengths must be an integer tensor, got ", lengths.scalar_type());
  TORCH_CHECK(!lengths.is_meta() || device.is_meta(), op, ": lengths must hold values (on the CPU or on the ",
              "inputs' device ", device, "), got a tensor on the meta device");
  return lengths.to(device, at::kLong);
}

at::Tensor checked_lengths(const char* op, const at::Tensor& lengths, int64_t B, int64_t T, at::Device device,
                           int64_t* shortest) {
  lengths_on(op, lengths, B, device);
  if (shortest != nullptr) *shortest = T;
  if (B > 0) {
    // One host read of two numbers: a length outside [0, T] would index past the batch.
    const auto [lo, hi] = at::aminmax(lengths.to(at::kLong));
    const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
    TORCH_CHECK(min >= 0 && max <= T, op, ": lengths must be in [0, T = ", T, "], got values in [", min, ", ", max,
                "]");
    if (shortest != nullptr) *shortest = min;
  }
  return lengths.to(device, at::kLong);
}

// Time indices [1, T] as int64 beside lengths.
at::Tensor time_index(const at::Tensor& lengths, const c10::SymInt& T) {
  return at::arange(c10::Scalar(T), lengths.options().dtype(at::kLong)).unsqueeze(0);
}

at::Tensor valid_steps(const at::Tensor& lengths, const c10::SymInt& T, at::ScalarType dtype) {
  return (time_index(lengths, T) < lengths.unsqueeze(1)).unsqueeze(-1).to(dtype);
}

at::Tensor held_index(const at::Tensor& lengths, const c10::SymInt& T) {
  return at::minimum(time_index(lengths, T), lengths.unsqueeze(1) - 1) + 1;
}

at::Tensor gather_steps(const at::Tensor& x, const at::Tensor& index) {
  std::vector<c10::SymInt> shape(index.sym_sizes().begin(), index.sym_sizes().end());
  at::Tensor i = index;
  for (int64_t d = 2; d < x.dim(); ++d) {
    i = i.unsqueeze(-1);
    shape.push_back(x.sym_size(d));
  }
  return x.gather(1, i.expand_symint(shape));
}

at::Tensor hold_past_lengths(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& lengths) {
  return gather_steps(at::cat({s0.unsqueeze(1), states}, 1), held_index(lengths, states.sym_size(1)));
}

std::tuple<at::Tensor, at::Tensor> route_held_gradient(const at::Tensor& grad, const at::Tensor& lengths) {
  const int64_t B = grad.size(0), T = grad.size(1), S = grad.size(2);
  const at::Tensor index = held_index(lengths, T).unsqueeze(-1).expand({B, T, S});
  const at::Tensor full = at::zeros({B, T + 1, S}, grad.options()).scatter_add_(1, index, grad);
  return {full.narrow(1, 1, T), full.select(1, 0)};
}

at::Tensor checked_resets(const char* op, const at::Tensor& resets, const c10::SymInt& B, const c10::SymInt& T,
                          at::Device device) {
  TORCH_CHECK(resets.dim() == 2 && resets.sym_size(0) == B && resets.sym_size(1) == T, op,
              ": resets must be a [B, T] = [", B, ", ", T, "] tensor, got shape ", resets.sym_sizes());
  TORCH_CHECK(resets.scalar_type() == at::kBool, op, ": resets must be a bool tensor, got ", resets.scalar_type());
  TORCH_CHECK(!resets.is_meta() || device.is_meta(), op, ": resets must hold values (on the CPU or on the inputs' ",
              "device ", device, "), got a tensor on the meta device");
  return resets.to(device);
}

at::Tensor carried_steps(const at::Tensor& resets, at::ScalarType dtype) {
  return resets.logical_not().unsqueeze(-1).to(dtype);
}

at::Tensor previous_steps(const at::Tensor& s0, const at::Tensor& s, const at::Tensor& resets,
                          const at::Tensor& entering) {
  if (entering.defined() && s.size(1) == 0) return s;  // an empty time shard
  const at::Tensor& first = entering.defined() ? entering : s0;
  const at::Tensor prev = at::cat({first.unsqueeze(1), s.narrow_symint(1, 0, s.sym_size(1) - 1)}, 1);
  return resets.defined() ? at::where(resets.unsqueeze(-1), s0.unsqueeze(1), prev) : prev;
}

at::Tensor reversed_index(const at::Tensor& lengths, const at::Tensor& resets, const c10::SymInt& T) {
  const at::Tensor& like = resets.defined() ? resets : lengths;
  const c10::SymInt B = like.sym_size(0);
  const at::Tensor t = time_index(like, T).expand_symint({B, T});
  const at::Tensor length = lengths.defined() ? lengths.unsqueeze(1) : at::full_like(t.narrow(1, 0, 1), T);
  const at::Tensor valid = t < length;
  // A segment [start, end]: start is the latest head at or before t (step 0 is one), end
  // the step before the next head, or the last valid step.
  const at::Tensor head = resets.defined() ? resets.logical_or(t == 0) : t == 0;
  const at::Tensor start = std::get<0>(at::cummax(at::where(head, t, at::zeros_like(t)), 1));
  const at::Tensor next_head = at::cat({head.narrow_symint(1, 1, T - 1), at::ones_like(head.narrow(1, 0, 1))}, 1);
  const at::Tensor boundary = next_head.logical_or(t == length - 1);
  const at::Tensor big = at::full_like(t, std::numeric_limits<int64_t>::max());
  const at::Tensor end = std::get<0>(at::cummin(at::where(boundary, t, big).flip(1), 1)).flip(1);
  return at::where(valid, start + end - t, t);
}

}  // namespace pnewton
