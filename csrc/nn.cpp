// pnewton::nn::GRU / LSTM / RNN: torch::nn-compatible modules on the Newton solver.
#include <torch/nn/init.h>
#include <torch/nn/module.h>

#include <cmath>

#include "pnewton/nn.h"

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

}  // namespace

int64_t RNNStack::gates() const { return cell == "gru" ? 3 : cell == "lstm" ? 4 : 1; }

void RNNStack::register_parameters(torch::nn::Module& module) {
  const int64_t D = options.hidden_size(), G = gates() * D, dirs = options.bidirectional() ? 2 : 1;
  TORCH_CHECK(options.input_size() > 0 && D > 0 && options.num_layers() > 0,
              "pnewton.nn: input_size, hidden_size and num_layers must be positive");
  TORCH_CHECK(options.dropout() >= 0 && options.dropout() <= 1, "pnewton.nn: dropout must be in [0, 1], got ",
              options.dropout());
  const double bound = 1.0 / std::sqrt(static_cast<double>(D));  // torch.nn's initialisation
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    at::Tensor p = torch::empty(shape);
    torch::nn::init::uniform_(p, -bound, bound);
    module.register_parameter(name, p);
  };
  for (int64_t layer = 0; layer < options.num_layers(); ++layer) {
    for (int64_t d = 0; d < dirs; ++d) {
      const std::string s = suffix(layer, d);
      add("weight_ih" + s, {G, layer == 0 ? options.input_size() : D * dirs});
      add("weight_hh" + s, {G, D});
      if (options.bias()) {
        add("bias_ih" + s, {G});
        add("bias_hh" + s, {G});
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> RNNStack::run(const torch::nn::Module& module, const at::Tensor& input,
                                                 const at::Tensor& state0, bool training) {
  std::vector<at::Tensor> params;
  const int64_t dirs = options.bidirectional() ? 2 : 1;
  for (int64_t layer = 0; layer < options.num_layers(); ++layer) {
    for (int64_t d = 0; d < dirs; ++d) {
      const std::string s = suffix(layer, d);
      for (const char* name : {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}) {
        if (options.bias() || name[0] == 'w') params.push_back(parameter(module, name + s));
      }
    }
  }
  const SolverOptions& o = options.solver();
  auto [out, final, iterations, residual, converged, path] =
      rnn_stack(cell, input, state0, params, options.bias(), options.num_layers(), options.dropout(), training,
                options.bidirectional(), options.batch_first(), o.method, o.max_iter, o.atol, o.rtol, o.damping,
                o.clip, o.init, o.fixed_iterations, o.fallback, o.adjoint);
  last_stats = SolveStats{iterations, residual, converged, path};
  return {out, final};
}

}  // namespace detail

namespace {

// Checks the input and returns (layers · directions, batch) for the initial state.
std::pair<int64_t, int64_t> state_shape(const RNNOptions& o, const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() == 3, "pnewton.nn.", name, ": input must be 3-d ([T, B, input] or batch_first), got ",
              input.dim(), "-d");
  TORCH_CHECK(input.size(-1) == o.input_size(), "pnewton.nn.", name, ": input.size(-1) must be ", o.input_size(),
              ", got ", input.size(-1));
  return {o.num_layers() * (o.bidirectional() ? 2 : 1), input.size(o.batch_first() ? 0 : 1)};
}

void check_state(const char* name, const char* arg, const at::Tensor& h, int64_t n, int64_t B, int64_t D) {
  TORCH_CHECK(h.dim() == 3 && h.size(0) == n && h.size(1) == B && h.size(2) == D, "pnewton.nn.", name, ": ", arg,
              " must have shape [", n, ", ", B, ", ", D, "], got ", h.sizes());
}

// GRU and RNN: one hidden state per layer and direction.
std::tuple<at::Tensor, at::Tensor> forward_hidden(detail::RNNStack& stack, const torch::nn::Module& module,
                                                  const RNNOptions& options, const char* name, const at::Tensor& input,
                                                  at::Tensor hx) {
  const auto [n, B] = state_shape(options, input, name);
  if (!hx.defined()) hx = torch::zeros({n, B, options.hidden_size()}, input.options());
  check_state(name, "hx", hx, n, B, options.hidden_size());
  return stack.run(module, input, hx, module.is_training());
}

}  // namespace

void detail::RNNStack::reset(torch::nn::Module& module, const RNNOptions& new_options) {
  options = new_options;
  register_parameters(module);
}

GRUImpl::GRUImpl(const GRUOptions& options_) : options(options_), stack_(options_, "gru") { reset(); }

void GRUImpl::reset() { stack_.reset(*this, options); }

std::tuple<at::Tensor, at::Tensor> GRUImpl::forward(const at::Tensor& input, at::Tensor hx) {
  return forward_hidden(stack_, *this, options, "GRU", input, std::move(hx));
}

LSTMImpl::LSTMImpl(const LSTMOptions& options_) : options(options_), stack_(options_, "lstm") { reset(); }

void LSTMImpl::reset() { stack_.reset(*this, options); }

std::tuple<at::Tensor, std::tuple<at::Tensor, at::Tensor>> LSTMImpl::forward(
    const at::Tensor& input, std::optional<std::tuple<at::Tensor, at::Tensor>> hx) {
  const auto [n, B] = state_shape(options, input, "LSTM");
  const int64_t D = options.hidden_size();
  if (!hx) hx = std::make_tuple(torch::zeros({n, B, D}, input.options()), torch::zeros({n, B, D}, input.options()));
  check_state("LSTM", "h0", std::get<0>(*hx), n, B, D);
  check_state("LSTM", "c0", std::get<1>(*hx), n, B, D);
  // The solver's LSTM state interleaves (h_i, c_i) per channel.
  const at::Tensor state0 = at::stack({std::get<0>(*hx), std::get<1>(*hx)}, -1).flatten(-2);
  auto [out, final] = stack_.run(*this, input, state0, is_training());
  const at::Tensor pairs = final.unflatten(-1, {D, 2});
  return {out, {pairs.select(-1, 0).contiguous(), pairs.select(-1, 1).contiguous()}};
}

RNNImpl::RNNImpl(const RNNOptions& options_)
    : options(options_), stack_(options_, options_.nonlinearity() == "relu" ? "rnn_relu" : "rnn_tanh") {
  TORCH_CHECK(options.nonlinearity() == "tanh" || options.nonlinearity() == "relu",
              "pnewton.nn.RNN: nonlinearity must be 'tanh' or 'relu', got '", options.nonlinearity(), "'");
  reset();
}

void RNNImpl::reset() { stack_.reset(*this, options); }

std::tuple<at::Tensor, at::Tensor> RNNImpl::forward(const at::Tensor& input, at::Tensor hx) {
  return forward_hidden(stack_, *this, options, "RNN", input, std::move(hx));
}

}  // namespace pnewton::nn
