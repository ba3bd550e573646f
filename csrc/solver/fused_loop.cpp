#include "csrc/solver/fused_loop.h"

#include <vector>

namespace pnewton {
namespace {

bool is_lstm(c10::string_view cell) { return cell == "lstm"; }

// One call of the ATen kernel on a padded batch (lengths undefined) or on packed data.
std::tuple<at::Tensor, at::Tensor> run(c10::string_view cell, const at::Tensor& input, const at::Tensor& batch_sizes,
                                       const at::Tensor& h0, const at::Tensor& c0, at::TensorList params,
                                       bool has_biases, int64_t layers, double dropout, bool train, bool bidirectional,
                                       bool batch_first, at::Tensor& c_final) {
  const bool packed = batch_sizes.defined();
  if (is_lstm(cell)) {
    auto [out, h, c] = packed ? at::lstm(input, batch_sizes, {h0, c0}, params, has_biases, layers, dropout, train,
                                         bidirectional)
                              : at::lstm(input, {h0, c0}, params, has_biases, layers, dropout, train, bidirectional,
                                         batch_first);
    c_final = c;
    return {out, h};
  }
  if (cell == "gru") {
    return packed ? at::gru(input, batch_sizes, h0, params, has_biases, layers, dropout, train, bidirectional)
                  : at::gru(input, h0, params, has_biases, layers, dropout, train, bidirectional, batch_first);
  }
  if (cell == "rnn_tanh") {
    return packed ? at::rnn_tanh(input, batch_sizes, h0, params, has_biases, layers, dropout, train, bidirectional)
                  : at::rnn_tanh(input, h0, params, has_biases, layers, dropout, train, bidirectional, batch_first);
  }
  return packed ? at::rnn_relu(input, batch_sizes, h0, params, has_biases, layers, dropout, train, bidirectional)
                : at::rnn_relu(input, h0, params, has_biases, layers, dropout, train, bidirectional, batch_first);
}

}  // namespace

bool fused_loop_applies(c10::string_view cell, const at::Tensor& input, int64_t shortest, const at::Tensor& resets) {
  if (!(cell == "gru" || cell == "lstm" || cell == "rnn_tanh" || cell == "rnn_relu")) return false;
  return !resets.defined() && input.numel() > 0 && shortest > 0;
}

std::tuple<at::Tensor, at::Tensor> fused_loop(c10::string_view cell, const at::Tensor& input,
                                              const at::Tensor& state0, at::TensorList params, bool has_biases,
                                              int64_t num_layers, double dropout, bool train, bool bidirectional,
                                              bool batch_first, bool projected, const at::Tensor& lengths) {
  // rnn_stack's state layout -> torch's (h0, c0).
  at::Tensor h0 = state0, c0;
  if (is_lstm(cell)) {
    // W_hh is [4·hidden, P] with a projection of size P, else [4·hidden, hidden].
    const int64_t P = projected ? params[1].size(1) : state0.size(-1) / 2;
    if (projected) {
      h0 = state0.narrow(-1, 0, P).contiguous(), c0 = state0.narrow(-1, P, state0.size(-1) - P).contiguous();
    } else {
      const at::Tensor pairs = state0.unflatten(-1, {P, 2});
      h0 = pairs.select(-1, 0).contiguous(), c0 = pairs.select(-1, 1).contiguous();
    }
  }
  at::Tensor output, h, c;
  if (!lengths.defined()) {
    std::tie(output, h) = run(cell, input, at::Tensor(), h0, c0, params, has_biases, num_layers, dropout, train,
                              bidirectional, batch_first, c);
  } else {
    // torch.nn's PackedSequence path: sorted by length, packed, run, padded back, unsorted.
    const int64_t batch_dim = batch_first ? 0 : 1, T = input.size(batch_first ? 1 : 0);
    const auto [sorted_lengths, order] = lengths.sort(0, /*descending=*/true);
    const at::Tensor restore = order.argsort();
    auto [data, batch_sizes] = at::_pack_padded_sequence(input.index_select(batch_dim, order), sorted_lengths.cpu(),
                                                         batch_first);
    at::Tensor out_data;
    std::tie(out_data, h) = run(cell, data, batch_sizes, h0.index_select(1, order),
                                c0.defined() ? c0.index_select(1, order) : c0, params, has_biases, num_layers,
                                dropout, train, bidirectional, batch_first, c);
    output = std::get<0>(at::_pad_packed_sequence(out_data, batch_sizes, batch_first, 0.0, T))
                 .index_select(batch_dim, restore);
    h = h.index_select(1, restore);
    if (c.defined()) c = c.index_select(1, restore);
  }
  if (!is_lstm(cell)) return {output, h};
  return {output, projected ? at::cat({h, c}, -1) : at::stack({h, c}, -1).flatten(-2)};
}

}  // namespace pnewton
