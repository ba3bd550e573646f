#pragma once
// torch::nn modules evaluated by the Newton solver: pnewton::nn::GRU, LSTM and RNN mirror
// torch::nn::GRU / LSTM / RNN (options, parameter names, forward), so state dicts and
// weights carry over. Link the pnewton library.
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pnewton/solver.h"

namespace pnewton::nn {

struct RNNOptions {
  RNNOptions(int64_t input_size, int64_t hidden_size) : input_size_(input_size), hidden_size_(hidden_size) {}
  TORCH_ARG(int64_t, input_size);
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, batch_first) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bidirectional) = false;
  TORCH_ARG(std::string, nonlinearity) = "tanh";  // RNN only: "tanh" or "relu"
  TORCH_ARG(SolverOptions, solver) = {};
};
using GRUOptions = RNNOptions;
using LSTMOptions = RNNOptions;

namespace detail {

// The layer stack shared by GRU, LSTM and RNN: every layer and direction is one solve.
class RNNStack {
 public:
  RNNStack(RNNOptions options, std::string cell) : options(std::move(options)), cell(std::move(cell)) {}
  RNNOptions options;
  std::string cell;  // gru | lstm | rnn_tanh | rnn_relu
  SolveStats last_stats;

  int64_t gates() const;
  // Registers torch.nn's parameters (weight_ih_l0, ..., _reverse) on `module`.
  void register_parameters(torch::nn::Module& module);
  // Takes the module's (possibly edited) options and registers fresh parameters.
  void reset(torch::nn::Module& module, const RNNOptions& new_options);
  // input [T, B, in] or [B, T, in] (batch_first), state0 [layers·dirs, B, S] -> (output, final).
  std::tuple<at::Tensor, at::Tensor> run(const torch::nn::Module& module, const at::Tensor& input,
                                         const at::Tensor& state0, bool training);
};

}  // namespace detail

class GRUImpl : public torch::nn::Cloneable<GRUImpl> {
 public:
  GRUImpl(int64_t input_size, int64_t hidden_size) : GRUImpl(GRUOptions(input_size, hidden_size)) {}
  explicit GRUImpl(const GRUOptions& options);
  void reset() override;
  // input [T, B, in] ([B, T, in] if batch_first); hx [layers·dirs, B, hidden] or undefined.
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::Tensor hx = {});
  const SolveStats& last_stats() const { return stack_.last_stats; }
  GRUOptions options;

 private:
  detail::RNNStack stack_;
};
TORCH_MODULE(GRU);

class LSTMImpl : public torch::nn::Cloneable<LSTMImpl> {
 public:
  LSTMImpl(int64_t input_size, int64_t hidden_size) : LSTMImpl(LSTMOptions(input_size, hidden_size)) {}
  explicit LSTMImpl(const LSTMOptions& options);
  void reset() override;
  std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> forward(
      const at::Tensor& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx = std::nullopt);
  const SolveStats& last_stats() const { return stack_.last_stats; }
  LSTMOptions options;

 private:
  detail::RNNStack stack_;
};
TORCH_MODULE(LSTM);

class RNNImpl : public torch::nn::Cloneable<RNNImpl> {
 public:
  RNNImpl(int64_t input_size, int64_t hidden_size) : RNNImpl(RNNOptions(input_size, hidden_size)) {}
  explicit RNNImpl(const RNNOptions& options);
  void reset() override;
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::Tensor hx = {});
  const SolveStats& last_stats() const { return stack_.last_stats; }
  RNNOptions options;

 private:
  detail::RNNStack stack_;
};
TORCH_MODULE(RNN);

}  // namespace pnewton::nn
