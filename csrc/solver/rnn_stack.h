#pragma once
// The layer stack of torch.nn's recurrent modules on the Newton solver: the one
// implementation behind pnewton.GRU/LSTM/RNN (Python) and pnewton::nn (C++).
#include <ATen/ATen.h>

#include <tuple>

namespace pnewton {

// (output, final states, then iterations, residual, converged, path per (layer, direction)
// [layers·dirs, B]); see rnn_stack in csrc/ops.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& state0, at::TensorList params, bool has_biases,
    int64_t num_layers, double dropout, bool train, bool bidirectional, bool batch_first, c10::string_view method,
    int64_t max_iter, double atol, double rtol, double damping, double clip, c10::string_view init,
    bool fixed_iterations, bool fallback, c10::string_view adjoint,
    const c10::optional<at::Tensor>& lengths = c10::nullopt, const c10::optional<at::Tensor>& resets = c10::nullopt,
    c10::string_view group = "");

}  // namespace pnewton
