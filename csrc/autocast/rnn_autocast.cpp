// Autocast kernels of the layer stack: torch.nn's AMP behaviour for recurrent layers.
// Under autocast, cuDNN's RNN runs in the autocast dtype (ATen casts _cudnn_rnn's
// arguments). On the CPU (torch 2.11, measured: tests/python/test_call_edges.py) the lstm
// op on padded input and rnn_tanh/rnn_relu run in the autocast dtype, while gru, and lstm on
// packed input (its packed overload is not on autocast's list), return their input's dtype
// (float32 for a float32 input, bfloat16 for the output of an autocast linear); the
// projected LSTM runs in the autocast dtype, its c_n in c0's (the layer casts it back). The
// stack casts its floating arguments by the same rule and runs below autocast; the solver
// computes in float32 whatever it stores. The per-channel cells follow their dense kin.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <vector>

#include "csrc/solver/rnn_stack.h"

namespace pnewton {
namespace {

template <c10::DispatchKey key, c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack_autocast(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& state0, at::TensorList params, bool has_biases,
    int64_t num_layers, double dropout, bool train, bool bidirectional, bool batch_first, c10::string_view method,
    int64_t max_iter, double atol, double rtol, double damping, double clip, c10::string_view init,
    bool fixed_iterations, bool fallback, c10::string_view adjoint, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& resets, c10::string_view group) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const bool lstm = cell == "lstm" || cell == "diag_lstm" || cell == "head_lstm";
  const bool rnn = cell == "rnn_tanh" || cell == "rnn_relu";
  const int64_t per = (has_biases ? 4 : 2) * (bidirectional ? 2 : 1) * num_layers;
  const bool projected = cell == "lstm" && static_cast<int64_t>(params.size()) == per + per / (has_biases ? 4 : 2);
  const bool lower = device == c10::DeviceType::CUDA || rnn || projected || (lstm && !lengths.has_value());
  const at::ScalarType type = lower ? at::autocast::get_autocast_dtype(device) : input.scalar_type();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(type, t, device); };
  std::vector<at::Tensor> cast_params;
  cast_params.reserve(params.size());
  for (const at::Tensor& p : params) cast_params.push_back(cast(p));
  return rnn_stack(cell, cast(input), cast(state0), cast_params, has_biases, num_layers, dropout, train, bidirectional,
                   batch_first, method, max_iter, atol, rtol, damping, clip, init, fixed_iterations, fallback, adjoint,
                   lengths, resets, group);
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, AutocastCPU, m) {
  m.impl("rnn_stack", &rnn_stack_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(pnewton, AutocastCUDA, m) {
  m.impl("rnn_stack", &rnn_stack_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace pnewton
