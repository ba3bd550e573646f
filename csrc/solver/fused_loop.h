#pragma once
// torch's own fused recurrent kernels (cuDNN on CUDA, oneDNN or ATen's loop on the CPU:
// at::gru, at::lstm, at::rnn_tanh, at::rnn_relu) for a whole layer stack: what auto runs
// where the parallel solve does not pay, and what method="sequential" runs. Their result is
// torch.nn's own, forwards and backwards (autograd through the ATen ops).
#include <ATen/ATen.h>

#include <tuple>

namespace pnewton {

// Whether the fused kernels can run this stack: a torch.nn cell (gru, lstm incl. its
// projection, rnn_tanh, rnn_relu), a non-empty input, no segment resets, and every length
// ≥ 1 (what packing needs; shortest: the smallest length, T without lengths).
bool fused_loop_applies(c10::string_view cell, const at::Tensor& input, int64_t shortest, const at::Tensor& resets);

// (output, final states [layers·dirs, B, S]) in rnn_stack's layout (LSTM: (h_i, c_i)
// interleaved, or [h | c] with a projection); lengths [B] int64 or undefined.
std::tuple<at::Tensor, at::Tensor> fused_loop(c10::string_view cell, const at::Tensor& input,
                                              const at::Tensor& state0, at::TensorList params, bool has_biases,
                                              int64_t num_layers, double dropout, bool train, bool bidirectional,
                                              bool batch_first, bool projected, const at::Tensor& lengths);

}  // namespace pnewton
