#pragma once
// torch::nn modules evaluated by the Newton solver: pnewton::nn::GRU, LSTM and RNN mirror
// torch::nn::GRU / LSTM / RNN (option types, parameter names, forward and
// forward_with_packed_input, pretty_print), so state dicts and weights carry over, plus
// the solver's options. Link the pnewton library.
#include <torch/arg.h>
#include <torch/enum.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/nn/utils/rnn.h>

#include <optional>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "pnewton/solver.h"

namespace pnewton::nn {

using torch::nn::utils::rnn::PackedSequence;

struct GRUOptions {
  GRUOptions(int64_t input_size, int64_t hidden_size) : input_size_(input_size), hidden_size_(hidden_size) {}
  TORCH_ARG(int64_t, input_size);
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, batch_first) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bidirectional) = false;
  TORCH_ARG(SolverOptions, solver) = {};
};

struct LSTMOptions {
  LSTMOptions(int64_t input_size, int64_t hidden_size) : input_size_(input_size), hidden_size_(hidden_size) {}
  TORCH_ARG(int64_t, input_size);
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, batch_first) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bidirectional) = false;
  TORCH_ARG(int64_t, proj_size) = 0;  // > 0: torch.nn's projected LSTM (weight_hr_l{k})
  TORCH_ARG(SolverOptions, solver) = {};
};

// The multi-head (block-diagonal) GRU and LSTM (Python: pnewton.HeadGRU / HeadLSTM): the
// hidden state split into `heads` heads of hidden_size / heads units, each head's gates
// reading only its own units; weight_hh_l{k} is [heads, G·k, k] (G = 3 for GRU, 4 for
// LSTM), head h's rows in torch.nn's gate order over its k units.
struct HeadOptions {
  HeadOptions(int64_t input_size, int64_t hidden_size, int64_t heads)
      : input_size_(input_size), hidden_size_(hidden_size), heads_(heads) {}
  TORCH_ARG(int64_t, input_size);
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, heads);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, batch_first) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bidirectional) = false;
  TORCH_ARG(SolverOptions, solver) = {};
};
using HeadGRUOptions = HeadOptions;
using HeadLSTMOptions = HeadOptions;

struct RNNOptions {
  typedef std::variant<torch::enumtype::kTanh, torch::enumtype::kReLU> nonlinearity_t;
  RNNOptions(int64_t input_size, int64_t hidden_size) : input_size_(input_size), hidden_size_(hidden_size) {}
  TORCH_ARG(int64_t, input_size);
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(nonlinearity_t, nonlinearity) = torch::kTanh;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, batch_first) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bidirectional) = false;
  TORCH_ARG(SolverOptions, solver) = {};
};

namespace detail {

// What the layer stack needs of any of the three option types.
struct StackOptions {
  std::string cell;  // gru | lstm | rnn_tanh | rnn_relu | head_gru | head_lstm
  int64_t input_size, hidden_size, num_layers, proj_size = 0;
  int64_t heads = 0;  // head cells: the number of heads
  bool bias, batch_first, bidirectional;
  double dropout;
  SolverOptions solver;
};
StackOptions stack_options(const GRUOptions& o);
StackOptions stack_options(const LSTMOptions& o);
StackOptions stack_options(const RNNOptions& o);
StackOptions stack_options(const HeadOptions& o, std::string cell);  // head_gru | head_lstm

// The layer stack shared by GRU, LSTM and RNN: every layer and direction is one solve.
class RNNStack {
 public:
  StackOptions options;
  SolveStats last_stats;                     // the worst over the layers and directions
  std::vector<SolveStats> last_layer_stats;  // per (layer, direction), in parameter order

  // Registers torch.nn's parameters (weight_ih_l0, ..., _reverse) on `module`, as
  // torch::nn does (a fresh set on every reset), with its initialisation.
  void reset(torch::nn::Module& module, StackOptions new_options);
  // input [T, B, in] or [B, T, in] (batch_first), state0 [layers·dirs, B, S]; lengths [B] or
  // undefined -> (output, final states [layers·dirs, B, S]).
  std::tuple<at::Tensor, at::Tensor> run(const torch::nn::Module& module, const at::Tensor& input,
                                         const at::Tensor& state0, bool training, const at::Tensor& lengths = {});
  // The same for a PackedSequence (state0 in sorted order); the output packed alike.
  std::tuple<PackedSequence, at::Tensor> run_packed(const torch::nn::Module& module, const PackedSequence& input,
                                                    const at::Tensor& state0, bool training);
  // torch::nn's description: "pnewton::nn::GRU(input_size=3, hidden_size=5, ...)".
  void pretty_print(std::ostream& stream, const char* name) const;
};

}  // namespace detail

class GRUImpl : public torch::nn::Cloneable<GRUImpl> {
 public:
  GRUImpl(int64_t input_size, int64_t hidden_size) : GRUImpl(GRUOptions(input_size, hidden_size)) {}
  explicit GRUImpl(const GRUOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override { stack_.pretty_print(stream, "GRU"); }
  // input [T, B, in] ([B, T, in] if batch_first); hx [layers·dirs, B, hidden] or undefined.
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::Tensor hx = {});
  // Variable-length batches, as torch::nn::GRU's: hx in the caller's batch order.
  std::tuple<PackedSequence, at::Tensor> forward_with_packed_input(const PackedSequence& packed_input,
                                                                   at::Tensor hx = {});
  const SolveStats& last_stats() const { return stack_.last_stats; }
  const std::vector<SolveStats>& last_layer_stats() const { return stack_.last_layer_stats; }
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
  void pretty_print(std::ostream& stream) const override { stack_.pretty_print(stream, "LSTM"); }
  std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> forward(
      const at::Tensor& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx = std::nullopt);
  std::tuple<PackedSequence, std::tuple<at::Tensor, at::Tensor>> forward_with_packed_input(
      const PackedSequence& packed_input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx = std::nullopt);
  const SolveStats& last_stats() const { return stack_.last_stats; }
  const std::vector<SolveStats>& last_layer_stats() const { return stack_.last_layer_stats; }
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
  void pretty_print(std::ostream& stream) const override { stack_.pretty_print(stream, "RNN"); }
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::Tensor hx = {});
  std::tuple<PackedSequence, at::Tensor> forward_with_packed_input(const PackedSequence& packed_input,
                                                                   at::Tensor hx = {});
  const SolveStats& last_stats() const { return stack_.last_stats; }
  const std::vector<SolveStats>& last_layer_stats() const { return stack_.last_layer_stats; }
  RNNOptions options;

 private:
  detail::RNNStack stack_;
};
TORCH_MODULE(RNN);

class HeadGRUImpl : public torch::nn::Cloneable<HeadGRUImpl> {
 public:
  HeadGRUImpl(int64_t input_size, int64_t hidden_size, int64_t heads)
      : HeadGRUImpl(HeadGRUOptions(input_size, hidden_size, heads)) {}
  explicit HeadGRUImpl(const HeadGRUOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override { stack_.pretty_print(stream, "HeadGRU"); }
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::Tensor hx = {});
  std::tuple<PackedSequence, at::Tensor> forward_with_packed_input(const PackedSequence& packed_input,
                                                                   at::Tensor hx = {});
  const SolveStats& last_stats() const { return stack_.last_stats; }
  const std::vector<SolveStats>& last_layer_stats() const { return stack_.last_layer_stats; }

  HeadGRUOptions options;

 private:
  detail::RNNStack stack_;
};
TORCH_MODULE(HeadGRU);

class HeadLSTMImpl : public torch::nn::Cloneable<HeadLSTMImpl> {
 public:
  HeadLSTMImpl(int64_t input_size, int64_t hidden_size, int64_t heads)
      : HeadLSTMImpl(HeadLSTMOptions(input_size, hidden_size, heads)) {}
  explicit HeadLSTMImpl(const HeadLSTMOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override { stack_.pretty_print(stream, "HeadLSTM"); }
  std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> forward(
      const at::Tensor& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx = std::nullopt);
  std::tuple<PackedSequence, std::tuple<at::Tensor, at::Tensor>> forward_with_packed_input(
      const PackedSequence& packed_input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx = std::nullopt);
  const SolveStats& last_stats() const { return stack_.last_stats; }
  const std::vector<SolveStats>& last_layer_stats() const { return stack_.last_layer_stats; }

  HeadLSTMOptions options;

 private:
  detail::RNNStack stack_;
};
TORCH_MODULE(HeadLSTM);

}  // namespace pnewton::nn
