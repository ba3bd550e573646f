// pnewton::nn::GRU / LSTM / RNN: torch::nn-compatible modules on the Newton solver.
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/utils/rnn.h>

#include <cmath>
#include <ostream>

#include "pnewton/nn.h"

#include "csrc/solver/newton.h"
#include "csrc/solver/rnn_stack.h"

namespace pnewton::nn {
namespace detail {

namespace {

std::string suffix(int64_t layer, int64_t direction) {
  return "_l" + std::to_string(layer) + (direction ? "_reverse" : "");
}

const at::Tensor& parameter(const torch::nn::Module& module, const std::string& name) {
  const at::Tensor* p = module.named_parameters(/*recurse=*/false).find(name);
  TORCH_CHECK(p != nullptr, "pnewton.nn: missing parameter ", name);
  return *p;
}

int64_t gates(const std::string& cell) {
  return cell == "gru" || cell == "head_gru" ? 3 : cell == "lstm" || cell == "head_lstm" ? 4 : 1;
}

template <typename Options>
StackOptions common(const Options& o, std::string cell) {
  StackOptions s;
  s.cell = std::move(cell);
  s.input_size = o.input_size(), s.hidden_size = o.hidden_size(), s.num_layers = o.num_layers();
  s.bias = o.bias(), s.batch_first = o.batch_first(), s.bidirectional = o.bidirectional();
  s.dropout = o.dropout(), s.solver = o.solver();
  return s;
}

}  // namespace

StackOptions stack_options(const GRUOptions& o) { return common(o, "gru"); }

StackOptions stack_options(const LSTMOptions& o) {
  StackOptions s = common(o, "lstm");
  s.proj_size = o.proj_size();
  return s;
}

StackOptions stack_options(const RNNOptions& o) {
  return common(o, std::holds_alternative<torch::enumtype::kReLU>(o.nonlinearity()) ? "rnn_relu" : "rnn_tanh");
}

StackOptions stack_options(const HeadOptions& o, std::string cell) {
  StackOptions s = common(o, std::move(cell));
  s.heads = o.heads();
  return s;
}

void RNNStack::reset(torch::nn::Module& module, StackOptions new_options) {
  options = std::move(new_options);
  const StackOptions& o = options;
  const int64_t D = o.hidden_size, G = gates(o.cell) * D, dirs = o.bidirectional ? 2 : 1;
  TORCH_CHECK(o.input_size > 0 && D > 0 && o.num_layers > 0,
              "pnewton.nn: input_size, hidden_size and num_layers must be positive");
  TORCH_CHECK(o.dropout >= 0 && o.dropout <= 1, "pnewton.nn: dropout must be in [0, 1], got ", o.dropout);
  TORCH_CHECK(o.proj_size >= 0 && o.proj_size < D, "pnewton.nn: proj_size must be in [0, hidden_size), got ",
              o.proj_size);
  const bool heads = o.cell == "head_gru" || o.cell == "head_lstm";
  TORCH_CHECK(!heads || (o.heads > 0 && D % o.heads == 0), "pnewton.nn: hidden_size (", D,
              ") must be a multiple of heads (", o.heads, ") > 0");
  newton_options(o.solver);  // the solver's options, checked at construction as at every call
  const int64_t out = o.proj_size > 0 ? o.proj_size : D;  // the layer's output (and h) size
  const double bound = 1.0 / std::sqrt(static_cast<double>(D));  // torch.nn's initialisation
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    at::Tensor p = torch::empty(shape);
    torch::nn::init::uniform_(p, -bound, bound);
    module.register_parameter(name, p);
  };
  for (int64_t layer = 0; layer < o.num_layers; ++layer) {
    for (int64_t d = 0; d < dirs; ++d) {
      const std::string s = suffix(layer, d);
      add("weight_ih" + s, {G, layer == 0 ? o.input_size : out * dirs});
      if (heads) {
        add("weight_hh" + s, {o.heads, G / o.heads, D / o.heads});  // [heads, gates · k, k]
      } else {
        add("weight_hh" + s, {G, out});
      }
      if (o.bias) {
        add("bias_ih" + s, {G});
        add("bias_hh" + s, {G});
      }
      if (o.proj_size > 0) add("weight_hr" + s, {o.proj_size, D});
    }
  }
}

namespace {

// torch.nn's parameter order: W_ih, W_hh[, b_ih, b_hh][, W_hr] per layer and direction.
std::vector<at::Tensor> stack_parameters(const torch::nn::Module& module, const StackOptions& o) {
  std::vector<at::Tensor> params;
  for (int64_t layer = 0; layer < o.num_layers; ++layer) {
    for (int64_t d = 0; d < (o.bidirectional ? 2 : 1); ++d) {
      const std::string s = suffix(layer, d);
      for (const char* name : {"weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"}) {
        const bool bias = name[0] == 'b', projection = std::string(name) == "weight_hr";
        if ((bias && !o.bias) || (projection && o.proj_size == 0)) continue;
        params.push_back(parameter(module, name + s));
      }
    }
  }
  return params;
}

std::tuple<at::Tensor, at::Tensor> solve_stack(RNNStack& stack, const torch::nn::Module& module,
                                               const at::Tensor& input, const at::Tensor& state0, bool training,
                                               bool batch_first, const at::Tensor& lengths) {
  const StackOptions& o = stack.options;
  const SolverOptions& s = o.solver;
  auto [out, final, iterations, residual, converged, path] =
      rnn_stack(o.cell, input, state0, stack_parameters(module, o), o.bias, o.num_layers, o.dropout, training,
                o.bidirectional, batch_first, s.method, s.max_iter, s.atol, s.rtol, s.damping, s.clip, s.init,
                s.fixed_iterations, s.fallback, s.adjoint,
                lengths.defined() ? c10::optional<at::Tensor>(lengths) : c10::nullopt, c10::nullopt, s.group);
  stack.last_stats = SolveStats::worst(iterations, residual, converged, path);
  stack.last_layer_stats.clear();
  for (int64_t i = 0; i < iterations.size(0); ++i) {
    stack.last_layer_stats.push_back({iterations[i], residual[i], converged[i], path[i]});
  }
  return {out, final};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> RNNStack::run(const torch::nn::Module& module, const at::Tensor& input,
                                                 const at::Tensor& state0, bool training, const at::Tensor& lengths) {
  return solve_stack(*this, module, input, state0, training, options.batch_first, lengths);
}

std::tuple<PackedSequence, at::Tensor> RNNStack::run_packed(const torch::nn::Module& module,
                                                            const PackedSequence& input, const at::Tensor& state0,
                                                            bool training) {
  namespace rnn = torch::nn::utils::rnn;
  // The packed steps as a padded time-major batch in sorted order, with its lengths.
  auto [padded, lengths] = rnn::pad_packed_sequence(PackedSequence(input.data(), input.batch_sizes()));
  auto [out, final] = solve_stack(*this, module, padded, state0, training, /*batch_first=*/false, lengths);
  const at::Tensor data = rnn::pack_padded_sequence(out, lengths).data();
  return {PackedSequence(data, input.batch_sizes(), input.sorted_indices(), input.unsorted_indices()), final};
}

void RNNStack::pretty_print(std::ostream& stream, const char* name) const {
  const StackOptions& o = options;
  stream << std::boolalpha << "pnewton::nn::" << name << "(input_size=" << o.input_size
         << ", hidden_size=" << o.hidden_size << ", num_layers=" << o.num_layers << ", bias=" << o.bias
         << ", batch_first=" << o.batch_first << ", dropout=" << o.dropout << ", bidirectional=" << o.bidirectional;
  if (o.proj_size > 0) stream << ", proj_size=" << o.proj_size;
  if (o.heads > 0) stream << ", heads=" << o.heads;
  if (o.cell == "rnn_relu") stream << ", nonlinearity=kReLU";
  stream << ", method=" << o.solver.method << ")";
}

}  // namespace detail

namespace {

// Checks the input and returns (layers · directions, batch) for the initial state.
std::pair<int64_t, int64_t> state_shape(const detail::StackOptions& o, const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() == 3, "pnewton.nn.", name, ": input must be 3-d ([T, B, input] or batch_first), got ",
              input.dim(), "-d");
  TORCH_CHECK(input.size(-1) == o.input_size, "pnewton.nn.", name, ": input.size(-1) must be ", o.input_size,
              ", got ", input.size(-1));
  return {o.num_layers * (o.bidirectional ? 2 : 1), input.size(o.batch_first ? 0 : 1)};
}

std::pair<int64_t, int64_t> packed_state_shape(const detail::StackOptions& o, const PackedSequence& input,
                                               const char* name) {
  TORCH_CHECK(input.data().dim() == 2 && input.data().size(-1) == o.input_size, "pnewton.nn.", name,
              ": packed input data must be [steps, ", o.input_size, "], got ", input.data().sizes());
  return {o.num_layers * (o.bidirectional ? 2 : 1), input.batch_sizes()[0].item<int64_t>()};
}

void check_state(const char* name, const char* arg, const at::Tensor& h, int64_t n, int64_t B, int64_t D) {
  TORCH_CHECK(h.dim() == 3 && h.size(0) == n && h.size(1) == B && h.size(2) == D, "pnewton.nn.", name, ": ", arg,
              " must have shape [", n, ", ", B, ", ", D, "], got ", h.sizes());
}

// The initial state of a packed batch is given in the caller's order; the solve runs sorted.
at::Tensor permuted(const at::Tensor& h, const at::Tensor& permutation) {
  return permutation.defined() ? h.index_select(1, permutation) : h;
}

// GRU and RNN: one hidden state per layer and direction.
at::Tensor hidden_state(const detail::StackOptions& o, const char* name, at::Tensor hx, int64_t n, int64_t B,
                        const at::TensorOptions& like) {
  if (!hx.defined()) hx = torch::zeros({n, B, o.hidden_size}, like);
  check_state(name, "hx", hx, n, B, o.hidden_size);
  return hx;
}

// LSTM: the solver's state interleaves (h_i, c_i) per channel, or is [h | c] with a projection.
at::Tensor lstm_state(const detail::StackOptions& o, const char* name,
                      std::optional<std::tuple<at::Tensor, at::Tensor>> hx, int64_t n, int64_t B,
                      const at::TensorOptions& like, const at::Tensor& permutation) {
  const int64_t D = o.hidden_size, P = o.proj_size > 0 ? o.proj_size : D;
  if (!hx) hx = std::make_tuple(torch::zeros({n, B, P}, like), torch::zeros({n, B, D}, like));
  check_state(name, "h0", std::get<0>(*hx), n, B, P);
  check_state(name, "c0", std::get<1>(*hx), n, B, D);
  const at::Tensor h0 = permuted(std::get<0>(*hx), permutation), c0 = permuted(std::get<1>(*hx), permutation);
  return o.proj_size > 0 ? at::cat({h0, c0}, -1) : at::stack({h0, c0}, -1).flatten(-2);
}

// GRU and RNN: forward and forward_with_packed_input.
std::tuple<at::Tensor, at::Tensor> forward_hidden(detail::RNNStack& stack, const torch::nn::Module& module,
                                                  const char* name, const at::Tensor& input, at::Tensor hx) {
  const auto [n, B] = state_shape(stack.options, input, name);
  return stack.run(module, input, hidden_state(stack.options, name, std::move(hx), n, B, input.options()),
                   module.is_training());
}

std::tuple<PackedSequence, at::Tensor> forward_hidden_packed(detail::RNNStack& stack, const torch::nn::Module& module,
                                                             const char* name, const PackedSequence& input,
                                                             at::Tensor hx) {
  const auto [n, B] = packed_state_shape(stack.options, input, name);
  const at::Tensor h0 = hidden_state(stack.options, name, std::move(hx), n, B, input.data().options());
  auto [out, final] = stack.run_packed(module, input, permuted(h0, input.sorted_indices()), module.is_training());
  return {out, permuted(final, input.unsorted_indices())};
}

std::tuple<at::Tensor, at::Tensor> lstm_final(const detail::StackOptions& o, const at::Tensor& final,
                                              const at::Tensor& permutation) {
  if (o.proj_size > 0) {
    return {permuted(final.narrow(-1, 0, o.proj_size), permutation).contiguous(),
            permuted(final.narrow(-1, o.proj_size, o.hidden_size), permutation).contiguous()};
  }
  const at::Tensor pairs = final.unflatten(-1, {o.hidden_size, 2});
  return {permuted(pairs.select(-1, 0), permutation).contiguous(),
          permuted(pairs.select(-1, 1), permutation).contiguous()};
}

// LSTM and HeadLSTM: forward and forward_with_packed_input.
using LSTMState = std::optional<std::tuple<at::Tensor, at::Tensor>>;

std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> forward_lstm(detail::RNNStack& stack,
                                                                        const torch::nn::Module& module,
                                                                        const char* name, const at::Tensor& input,
                                                                        LSTMState hx) {
  const auto [n, B] = state_shape(stack.options, input, name);
  const at::Tensor state0 = lstm_state(stack.options, name, std::move(hx), n, B, input.options(), {});
  auto [out, final] = stack.run(module, input, state0, module.is_training());
  return {out, lstm_final(stack.options, final, {})};
}

std::tuple<PackedSequence, std::tuple<at::Tensor, at::Tensor>> forward_lstm_packed(
    detail::RNNStack& stack, const torch::nn::Module& module, const char* name, const PackedSequence& input,
    LSTMState hx) {
  const auto [n, B] = packed_state_shape(stack.options, input, name);
  const at::Tensor state0 =
      lstm_state(stack.options, name, std::move(hx), n, B, input.data().options(), input.sorted_indices());
  auto [out, final] = stack.run_packed(module, input, state0, module.is_training());
  return {out, lstm_final(stack.options, final, input.unsorted_indices())};
}

}  // namespace

GRUImpl::GRUImpl(const GRUOptions& options_) : options(options_) { reset(); }

void GRUImpl::reset() { stack_.reset(*this, detail::stack_options(options)); }

std::tuple<at::Tensor, at::Tensor> GRUImpl::forward(const at::Tensor& input, at::Tensor hx) {
  return forward_hidden(stack_, *this, "GRU", input, std::move(hx));
}

std::tuple<PackedSequence, at::Tensor> GRUImpl::forward_with_packed_input(const PackedSequence& input,
                                                                          at::Tensor hx) {
  return forward_hidden_packed(stack_, *this, "GRU", input, std::move(hx));
}

LSTMImpl::LSTMImpl(const LSTMOptions& options_) : options(options_) { reset(); }

void LSTMImpl::reset() { stack_.reset(*this, detail::stack_options(options)); }

std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> LSTMImpl::forward(
    const at::Tensor& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx) {
  return forward_lstm(stack_, *this, "LSTM", input, std::move(hx));
}

std::tuple<PackedSequence, std::tuple<at::Tensor, at::Tensor>> LSTMImpl::forward_with_packed_input(
    const PackedSequence& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx) {
  return forward_lstm_packed(stack_, *this, "LSTM", input, std::move(hx));
}

RNNImpl::RNNImpl(const RNNOptions& options_) : options(options_) { reset(); }

void RNNImpl::reset() { stack_.reset(*this, detail::stack_options(options)); }

std::tuple<at::Tensor, at::Tensor> RNNImpl::forward(const at::Tensor& input, at::Tensor hx) {
  return forward_hidden(stack_, *this, "RNN", input, std::move(hx));
}

std::tuple<PackedSequence, at::Tensor> RNNImpl::forward_with_packed_input(const PackedSequence& input,
                                                                          at::Tensor hx) {
  return forward_hidden_packed(stack_, *this, "RNN", input, std::move(hx));
}

HeadGRUImpl::HeadGRUImpl(const HeadGRUOptions& options_) : options(options_) { reset(); }

void HeadGRUImpl::reset() { stack_.reset(*this, detail::stack_options(options, "head_gru")); }

std::tuple<at::Tensor, at::Tensor> HeadGRUImpl::forward(const at::Tensor& input, at::Tensor hx) {
  return forward_hidden(stack_, *this, "HeadGRU", input, std::move(hx));
}

std::tuple<PackedSequence, at::Tensor> HeadGRUImpl::forward_with_packed_input(const PackedSequence& input,
                                                                              at::Tensor hx) {
  return forward_hidden_packed(stack_, *this, "HeadGRU", input, std::move(hx));
}

HeadLSTMImpl::HeadLSTMImpl(const HeadLSTMOptions& options_) : options(options_) { reset(); }

void HeadLSTMImpl::reset() { stack_.reset(*this, detail::stack_options(options, "head_lstm")); }

std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> HeadLSTMImpl::forward(
    const at::Tensor& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx) {
  return forward_lstm(stack_, *this, "HeadLSTM", input, std::move(hx));
}

std::tuple<PackedSequence, std::tuple<at::Tensor, at::Tensor>> HeadLSTMImpl::forward_with_packed_input(
    const PackedSequence& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx) {
  return forward_lstm_packed(stack_, *this, "HeadLSTM", input, std::move(hx));
}

}  // namespace pnewton::nn
