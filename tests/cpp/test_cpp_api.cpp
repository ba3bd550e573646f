// The pnewton C++ API through LibTorch: modules against torch::nn on the same weights,
// gradients through torch::autograd, scans and the solver through the dispatcher, errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <pnewton/pnewton.h>

#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "csrc/cpu/cell_kernels.h"
#include "csrc/scan.h"

namespace {

template <typename Ours, typename Theirs>
void copy_weights(Ours& ours, Theirs& theirs) {
  torch::NoGradGuard no_grad;
  auto src = theirs->named_parameters();
  for (auto& p : ours->named_parameters()) p.value().copy_(src[p.key()]);
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_LE((a - b).abs().max().item<double>(), tol);
}

TEST(CppApi, GRUMatchesTorchNNForwardAndGradients) {
  torch::manual_seed(0);
  auto opts = pnewton::nn::GRUOptions(3, 5).num_layers(2).bidirectional(true).batch_first(true);
  pnewton::nn::GRU ours(opts);
  torch::nn::GRU theirs(torch::nn::GRUOptions(3, 5).num_layers(2).bidirectional(true).batch_first(true));
  ours->to(torch::kDouble);
  theirs->to(torch::kDouble);
  copy_weights(ours, theirs);
  const auto x = torch::randn({2, 50, 3}, torch::kDouble);
  auto [out, h] = ours->forward(x);
  auto [out_ref, h_ref] = theirs->forward(x);
  expect_close(out, out_ref, 1e-8);
  expect_close(h, h_ref, 1e-8);
  EXPECT_TRUE(ours->last_stats().converged.all().item<bool>());
  const auto g = torch::randn_like(out);
  (out * g).sum().backward();
  (out_ref * g).sum().backward();
  auto ref_params = theirs->named_parameters();
  for (auto& p : ours->named_parameters()) expect_close(p.value().grad(), ref_params[p.key()].grad(), 1e-7);
}

TEST(CppApi, LSTMAndRNNMatchTorchNN) {
  torch::manual_seed(1);
  pnewton::nn::LSTM lstm(pnewton::nn::LSTMOptions(4, 6));
  torch::nn::LSTM lstm_ref(torch::nn::LSTMOptions(4, 6));
  lstm->to(torch::kDouble);
  lstm_ref->to(torch::kDouble);
  copy_weights(lstm, lstm_ref);
  const auto x = torch::randn({40, 3, 4}, torch::kDouble);
  const auto h0 = torch::randn({1, 3, 6}, torch::kDouble), c0 = torch::randn({1, 3, 6}, torch::kDouble);
  auto [out, hc] = lstm->forward(x, std::make_tuple(h0, c0));
  auto [out_ref, hc_ref] = lstm_ref->forward(x, std::make_tuple(h0, c0));
  expect_close(out, out_ref, 1e-8);
  expect_close(std::get<1>(hc), std::get<1>(hc_ref), 1e-8);

  pnewton::nn::RNN rnn(pnewton::nn::RNNOptions(4, 6).nonlinearity(torch::kReLU));
  torch::nn::RNN rnn_ref(torch::nn::RNNOptions(4, 6).nonlinearity(torch::kReLU));
  rnn->to(torch::kDouble);
  rnn_ref->to(torch::kDouble);
  copy_weights(rnn, rnn_ref);
  expect_close(std::get<0>(rnn->forward(x)), std::get<0>(rnn_ref->forward(x)), 1e-8);
}

// A head module's weight_hh [H, G·k, k] as torch::nn's dense block-diagonal [G·H·k, H·k].
torch::Tensor dense_heads(const torch::Tensor& w) {
  const int64_t H = w.size(0), k = w.size(2), G = w.size(1) / k;
  auto out = torch::zeros({G * H * k, H * k}, w.options());
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      out.narrow(0, g * H * k + h * k, k).narrow(1, h * k, k).copy_(w[h].narrow(0, g * k, k));
    }
  }
  return out;
}

template <typename Ours, typename Theirs>
void copy_head_weights(Ours& ours, Theirs& theirs) {
  torch::NoGradGuard no_grad;
  auto src = ours->named_parameters();
  for (auto& p : theirs->named_parameters()) {
    const auto& w = src[p.key()];
    p.value().copy_(p.key().rfind("weight_hh", 0) == 0 ? dense_heads(w) : w);
  }
}

TEST(CppApi, HeadModulesMatchTorchNNWithTheDenseBlockDiagonalWeight) {
  torch::manual_seed(5);
  pnewton::nn::HeadGRU gru(pnewton::nn::HeadGRUOptions(3, 8, 4).num_layers(2).bidirectional(true));
  torch::nn::GRU gru_ref(torch::nn::GRUOptions(3, 8).num_layers(2).bidirectional(true));
  gru->to(torch::kDouble);
  gru_ref->to(torch::kDouble);
  ASSERT_EQ(gru->named_parameters()["weight_hh_l1_reverse"].sizes(), (std::vector<int64_t>{4, 6, 2}));
  copy_head_weights(gru, gru_ref);
  const auto x = torch::randn({60, 3, 3}, torch::kDouble);
  expect_close(std::get<0>(gru->forward(x)), std::get<0>(gru_ref->forward(x)), 1e-10);
  EXPECT_LE(gru->last_stats().iterations.max().item<int64_t>(), 10);  // exact Newton on 2×2 blocks

  pnewton::nn::HeadLSTM lstm(pnewton::nn::HeadLSTMOptions(3, 6, 2).batch_first(true));
  torch::nn::LSTM lstm_ref(torch::nn::LSTMOptions(3, 6).batch_first(true));
  lstm->to(torch::kDouble);
  lstm_ref->to(torch::kDouble);
  copy_head_weights(lstm, lstm_ref);
  const auto xb = torch::randn({3, 60, 3}, torch::kDouble);
  auto [out, hc] = lstm->forward(xb);
  auto [out_ref, hc_ref] = lstm_ref->forward(xb);
  expect_close(out, out_ref, 1e-10);
  expect_close(std::get<1>(hc), std::get<1>(hc_ref), 1e-10);
  std::ostringstream text;
  lstm->pretty_print(text);
  EXPECT_NE(text.str().find("pnewton::nn::HeadLSTM(input_size=3, hidden_size=6"), std::string::npos) << text.str();
  EXPECT_NE(text.str().find("heads=2"), std::string::npos) << text.str();
  try {
    pnewton::nn::HeadGRU bad(pnewton::nn::HeadGRUOptions(3, 10, 4));
    ADD_FAILURE() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("hidden_size (10) must be a multiple of heads (4)"), std::string::npos);
  }
}

TEST(CppApi, PackedInputMatchesTorchNNForEveryModule) {
  torch::manual_seed(5);
  namespace rnn = torch::nn::utils::rnn;
  const auto x = torch::randn({30, 4, 3}, torch::kDouble);
  const auto packed = rnn::pack_padded_sequence(x, torch::tensor({30, 1, 17, 30}), /*batch_first=*/false,
                                                /*enforce_sorted=*/false);
  pnewton::nn::GRU gru(pnewton::nn::GRUOptions(3, 5).num_layers(2).bidirectional(true));
  torch::nn::GRU gru_ref(torch::nn::GRUOptions(3, 5).num_layers(2).bidirectional(true));
  gru->to(torch::kDouble);
  gru_ref->to(torch::kDouble);
  copy_weights(gru, gru_ref);
  const auto h0 = torch::randn({4, 4, 5}, torch::kDouble);
  auto [out, h] = gru->forward_with_packed_input(packed, h0);
  auto [out_ref, h_ref] = gru_ref->forward_with_packed_input(packed, h0);
  expect_close(out.data(), out_ref.data(), 1e-8);
  expect_close(h, h_ref, 1e-8);
  EXPECT_TRUE(torch::equal(out.unsorted_indices(), out_ref.unsorted_indices()));

  pnewton::nn::LSTM lstm(pnewton::nn::LSTMOptions(3, 6).proj_size(2));
  torch::nn::LSTM lstm_ref(torch::nn::LSTMOptions(3, 6).proj_size(2));
  lstm->to(torch::kDouble);
  lstm_ref->to(torch::kDouble);
  copy_weights(lstm, lstm_ref);
  auto [lstm_out, hc] = lstm->forward_with_packed_input(packed);
  auto [lstm_out_ref, hc_ref] = lstm_ref->forward_with_packed_input(packed);
  expect_close(lstm_out.data(), lstm_out_ref.data(), 1e-8);
  expect_close(std::get<0>(hc), std::get<0>(hc_ref), 1e-8);
  expect_close(std::get<1>(hc), std::get<1>(hc_ref), 1e-8);

  pnewton::nn::RNN rnn_ours(pnewton::nn::RNNOptions(3, 5).nonlinearity(torch::kTanh));
  torch::nn::RNN rnn_ref(torch::nn::RNNOptions(3, 5).nonlinearity(torch::kTanh));
  rnn_ours->to(torch::kDouble);
  rnn_ref->to(torch::kDouble);
  copy_weights(rnn_ours, rnn_ref);
  expect_close(std::get<0>(rnn_ours->forward_with_packed_input(packed)).data(),
               std::get<0>(rnn_ref->forward_with_packed_input(packed)).data(), 1e-8);
}

TEST(CppApi, ProjectedLSTMMatchesTorchNNAndPrettyPrintShowsTheOptions) {
  torch::manual_seed(6);
  pnewton::nn::LSTM ours(pnewton::nn::LSTMOptions(3, 6).proj_size(4).num_layers(2).batch_first(true));
  torch::nn::LSTM theirs(torch::nn::LSTMOptions(3, 6).proj_size(4).num_layers(2).batch_first(true));
  ours->to(torch::kDouble);
  theirs->to(torch::kDouble);
  EXPECT_EQ(ours->named_parameters().keys(), theirs->named_parameters().keys());
  copy_weights(ours, theirs);
  const auto x = torch::randn({2, 60, 3}, torch::kDouble);
  auto [out, hc] = ours->forward(x);
  auto [out_ref, hc_ref] = theirs->forward(x);
  expect_close(out, out_ref, 1e-8);
  expect_close(std::get<1>(hc), std::get<1>(hc_ref), 1e-8);
  std::ostringstream text;
  ours->pretty_print(text);
  EXPECT_EQ(text.str(), "pnewton::nn::LSTM(input_size=3, hidden_size=6, num_layers=2, bias=true, batch_first=true, "
                        "dropout=0, bidirectional=false, proj_size=4, method=auto)");
}

TEST(CppApi, ScanAndSolverThroughTheDispatcherWithAutograd) {
  torch::manual_seed(2);
  const auto a = torch::rand({2, 30, 3}, torch::kDouble).requires_grad_();
  const auto b = torch::randn({2, 30, 3}, torch::kDouble).requires_grad_();
  auto x = pnewton::scan_diag(a, b);
  auto loop = torch::zeros({2, 3}, torch::kDouble);
  std::vector<torch::Tensor> steps;
  for (int64_t t = 0; t < 30; ++t) steps.push_back(loop = a.select(1, t) * loop + b.select(1, t));
  const auto ref = torch::stack(steps, 1);
  expect_close(x, ref, 1e-12);
  auto grads = torch::autograd::grad({x.square().sum()}, {a, b});
  auto grads_ref = torch::autograd::grad({ref.square().sum()}, {a, b});
  expect_close(grads[0], grads_ref[0], 1e-10);
  expect_close(grads[1], grads_ref[1], 1e-10);

  const auto gi = torch::randn({2, 100, 12}, torch::kDouble);
  const auto W = torch::randn({12, 4}, torch::kDouble) * 0.3;
  pnewton::SolverOptions o;
  o.method = "deer";
  auto [states, stats] = pnewton::newton_rnn("gru", gi, W, std::nullopt, torch::zeros({2, 4}, torch::kDouble), o);
  o.method = "sequential";
  auto [exact, _] = pnewton::newton_rnn("gru", gi, W, std::nullopt, torch::zeros({2, 4}, torch::kDouble), o);
  expect_close(states, exact, 1e-9);
  EXPECT_LE(stats.iterations.max().item<int64_t>(), 6);
}

// x_t = C x_prev + b_t step by step (C = A_t or its transpose; shifted: the previous
// step's matrix, none at the first step, no x0), in processing order.
torch::Tensor loop_scan(const torch::Tensor& A, const torch::Tensor& b, const torch::Tensor& x0, bool reverse,
                        bool transpose, bool shift) {
  const int64_t T = b.size(1);
  auto x = torch::empty_like(b);
  auto s = x0.defined() && !shift ? x0.clone() : torch::zeros_like(b.select(1, 0));
  for (int64_t pos = 0; pos < T; ++pos) {
    const int64_t t = reverse ? T - 1 - pos : pos, ta = shift ? (reverse ? t + 1 : t - 1) : t;
    if (shift && pos == 0) {
      s = b.select(1, t).clone();
    } else {
      auto C = A.select(1, ta);
      if (transpose) C = C.transpose(-1, -2);
      s = torch::matmul(C, s.unsqueeze(-1)).squeeze(-1) + b.select(1, t);
    }
    x.select(1, t).copy_(s);
  }
  return x;
}

TEST(ScanByDoubling, MatchesTheLoopForEveryDirectionAndBlockSize) {
  torch::manual_seed(4);
  for (int64_t k : {1, 3, 40}) {
    for (int64_t T : {1, 2, 7, 64, 129}) {
      const auto A = torch::randn({2, T, 3, k, k}, torch::kDouble) / std::sqrt(double(k));
      const auto b = torch::randn({2, T, 3, k}, torch::kDouble), x0 = torch::randn({2, 3, k}, torch::kDouble);
      for (int flags = 0; flags < 16; ++flags) {
        const bool reverse = flags & 1, transpose = flags & 2, shift = flags & 4, with_x0 = flags & 8;
        auto x = torch::empty_like(b);
        pnewton::scan_by_doubling({A, b, with_x0 ? x0 : torch::Tensor(), x, reverse, transpose, shift});
        const auto ref = loop_scan(A, b, with_x0 ? x0 : torch::Tensor(), reverse, transpose, shift);
        EXPECT_LT((x - ref).abs().max().item<double>(), 1e-10 * (1 + ref.abs().max().item<double>()))
            << "k=" << k << " T=" << T << " flags=" << flags;
      }
    }
  }
}

// The same module on the GPU in float32 against torch::nn in float64 on the CPU.
TEST(CppApi, CudaGRUMatchesTorchNNFloat64) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(3);
  pnewton::SolverOptions solver;
  solver.method = "quasi_deer";
  solver.atol = solver.rtol = 3e-7;
  pnewton::nn::GRU ours(pnewton::nn::GRUOptions(3, 16).batch_first(true).solver(solver));
  torch::nn::GRU theirs(torch::nn::GRUOptions(3, 16).batch_first(true));
  theirs->to(torch::kDouble);
  copy_weights(ours, theirs);
  ours->to(torch::kCUDA);
  const auto x = torch::randn({4, 3000, 3}, torch::kDouble);
  const auto out = std::get<0>(ours->forward(x.to(torch::kCUDA, torch::kFloat))).to(torch::kCPU, torch::kDouble);
  const auto ref = std::get<0>(theirs->forward(x));
  EXPECT_LT(((out - ref).norm() / ref.norm()).item<double>(), 1e-5);
}

// An example user cell: a leaky tanh RNN, s' = (1 - a) s + a tanh(W s + u), with its
// parameter W. Only step() is given; Jacobians and products come from autograd.
class LeakyTanhCell : public pnewton::CellFunction {
 public:
  LeakyTanhCell(torch::Tensor W, double leak) : W_(std::move(W)), leak_(leak) {}
  int64_t state_size() const override { return W_.size(0); }
  torch::Tensor step(const torch::Tensor& s, const torch::Tensor& u) const override {
    return (1 - leak_) * s + leak_ * torch::tanh(torch::matmul(s, W_.t()) + u);
  }

 private:
  torch::Tensor W_;
  double leak_;
};

TEST(CppApi, UserCellSolvesToItsSequentialLoopWithExactGradients) {
  torch::manual_seed(3);
  const auto W = (torch::randn({4, 4}, torch::kDouble) * 0.5).requires_grad_();
  const auto s0 = torch::randn({2, 4}, torch::kDouble).requires_grad_();
  const auto u = torch::randn({2, 300, 4}, torch::kDouble).requires_grad_();
  LeakyTanhCell cell(W, 0.3);
  for (const char* method : {"deer", "quasi_deer", "jacobi"}) {
    pnewton::SolverOptions o;
    o.method = method;
    o.fallback = false;
    o.max_iter = 300;
    o.atol = o.rtol = 1e-13;
    auto [states, stats] = pnewton::solve(cell, s0, u, o);
    ASSERT_TRUE(stats.converged.all().item<bool>()) << method;
    // The sequential loop, differentiated by plain autograd.
    std::vector<torch::Tensor> steps;
    auto s = s0;
    for (int64_t t = 0; t < 300; ++t) steps.push_back(s = cell.step(s, u.select(1, t)));
    const auto loop = torch::stack(steps, 1);
    expect_close(states, loop, 1e-10);
    const auto g = torch::randn_like(loop);
    auto ours = torch::autograd::grad({(states * g).sum()}, {W, s0, u});
    auto ref = torch::autograd::grad({(loop * g).sum()}, {W, s0, u});
    for (size_t i = 0; i < ours.size(); ++i) expect_close(ours[i], ref[i], 1e-9);
  }
}

// A step that ignores the state: ∂f/∂s = 0, so autograd finds no path from s to f.
class InputOnlyCell : public pnewton::CellFunction {
 public:
  int64_t state_size() const override { return 3; }
  torch::Tensor step(const torch::Tensor&, const torch::Tensor& u) const override { return torch::tanh(u); }
};

TEST(Reliability, UserCellThatIgnoresTheStateSolvesWithEveryMethod) {
  const auto u = torch::randn({2, 20, 3}, torch::kDouble).requires_grad_();
  const auto s0 = torch::zeros({2, 3}, torch::kDouble);
  InputOnlyCell cell;
  for (const char* method : {"deer", "quasi_deer", "auto", "elk_filter", "elk", "jacobi"}) {
    pnewton::SolverOptions o;
    o.method = method;
    auto [states, stats] = pnewton::solve(cell, s0, u, o);
    EXPECT_TRUE(stats.converged.all().item<bool>()) << method;
    expect_close(states, torch::tanh(u), 1e-12);
    const auto grad = torch::autograd::grad({states.sum()}, {u})[0];
    expect_close(grad, 1 - torch::tanh(u).square(), 1e-12);
  }
}

TEST(Reliability, EmptyBatchesGiveEmptyOutputsAsTorchNN) {
  pnewton::nn::GRU gru(pnewton::nn::GRUOptions(3, 5).num_layers(2));
  auto [out, h] = gru->forward(torch::randn({7, 0, 3}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{7, 0, 5}));
  EXPECT_EQ(h.sizes(), (std::vector<int64_t>{2, 0, 5}));
  pnewton::nn::LSTM lstm(pnewton::nn::LSTMOptions(3, 4));
  auto [out_l, hc] = lstm->forward(torch::randn({7, 0, 3}));
  EXPECT_EQ(out_l.sizes(), (std::vector<int64_t>{7, 0, 4}));
  EXPECT_EQ(std::get<1>(hc).sizes(), (std::vector<int64_t>{1, 0, 4}));
  auto [states, stats] =
      pnewton::newton_rnn("gru", torch::randn({0, 6, 15}), torch::randn({15, 5}), std::nullopt, torch::zeros({0, 5}));
  EXPECT_EQ(states.sizes(), (std::vector<int64_t>{0, 6, 5}));
  EXPECT_EQ(stats.converged.numel(), 0);
  LeakyTanhCell cell(torch::randn({4, 4}), 0.3);
  auto [user_states, user_stats] = pnewton::solve(cell, torch::zeros({0, 4}), torch::randn({0, 6, 4}));
  EXPECT_EQ(user_states.sizes(), (std::vector<int64_t>{0, 6, 4}));
}

void expect_error_mentioning(const std::function<void()>& call, const std::string& text) {
  try {
    call();
    FAIL() << "expected an error mentioning '" << text << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

TEST(Reliability, MixedDevicesAndBadOptionsRaiseNamingTheArgument) {
  const auto meta = torch::TensorOptions().device(torch::kMeta);
  // The meta key wins dispatch: the meta kernels must check devices as the real ones do.
  expect_error_mentioning([&] { pnewton::scan_diag(torch::rand({2, 5, 3}, meta), torch::rand({2, 5, 3})); },
                          "b must be on the device of a");
  expect_error_mentioning(
      [&] {
        pnewton::newton_rnn("gru", torch::randn({1, 4, 15}), torch::randn({15, 5}, meta), std::nullopt,
                            torch::zeros({1, 5}));
      },
      "W_hh must be on the device of gi");
  pnewton::SolverOptions o;
  o.method = "elk";
  o.damping = 1e300;
  expect_error_mentioning(
      [&] { pnewton::newton_rnn("gru", torch::randn({1, 4, 15}), torch::randn({15, 5}), std::nullopt,
                                torch::zeros({1, 5}), o); },
      "damping");
  o = {};
  o.atol = NAN;
  expect_error_mentioning(
      [&] { pnewton::newton_rnn("gru", torch::randn({1, 4, 15}), torch::randn({15, 5}), std::nullopt,
                                torch::zeros({1, 5}), o); },
      "atol");
  // A module checks its solver options at construction, whichever path its calls take.
  o = {};
  o.damping = 1.5;
  expect_error_mentioning([&] { pnewton::nn::GRU(pnewton::nn::GRUOptions(3, 4).solver(o)); },
                          "damping must be in [0, 1)");
}

TEST(Reliability, NonFiniteSequencesAreNeverConvergedAndKeepTheLoopsNaNPattern) {
  torch::manual_seed(5);
  auto gi = torch::randn({2, 12, 15}, torch::kDouble);
  gi[0][4][2] = NAN;
  const auto W = torch::randn({15, 5}, torch::kDouble) * 0.3, s0 = torch::zeros({2, 5}, torch::kDouble);
  pnewton::SolverOptions seq;
  seq.method = "sequential";
  const auto loop = std::get<0>(pnewton::newton_rnn("gru", gi, W, std::nullopt, s0, seq));
  for (const char* method : {"sequential", "deer", "quasi_deer", "auto", "picard"}) {
    for (const bool fallback : {true, false}) {
      pnewton::SolverOptions o;
      o.method = method;
      o.fallback = fallback;
      auto [states, stats] = pnewton::newton_rnn("gru", gi, W, std::nullopt, s0, o);
      EXPECT_FALSE(stats.converged[0].item<bool>()) << method;
      EXPECT_TRUE(std::isnan(stats.residual[0].item<double>())) << method;
      EXPECT_TRUE(stats.converged[1].item<bool>()) << method;
      EXPECT_TRUE(torch::equal(states.isnan(), loop.isnan())) << method << " fallback " << fallback;
      EXPECT_LE(stats.iterations.max().item<int64_t>(), 12) << method;
    }
  }
}

TEST(Reliability, DoubleBackwardOfAUserCellSolveRaises) {
  const auto W = torch::randn({4, 4}, torch::kDouble).mul(0.3).requires_grad_();
  LeakyTanhCell cell(W, 0.3);
  auto [states, stats] = pnewton::solve(cell, torch::zeros({1, 4}, torch::kDouble), torch::randn({1, 8, 4}, torch::kDouble));
  // create_graph=True asks for a differentiable gradient: refused, not silently wrong.
  expect_error_mentioning([&] { torch::autograd::grad({states.square().sum()}, {W}, {}, true, true); },
                          "double backward");
}

TEST(CppApi, SequentialMethodRunsTorchsFusedKernelsBitwise) {
  torch::manual_seed(6);
  pnewton::SolverOptions o;
  o.method = "sequential";
  pnewton::nn::LSTM ours(pnewton::nn::LSTMOptions(3, 5).num_layers(2).bidirectional(true).solver(o));
  torch::nn::LSTM theirs(torch::nn::LSTMOptions(3, 5).num_layers(2).bidirectional(true));
  copy_weights(ours, theirs);
  const auto x = torch::randn({30, 2, 3});
  auto [out, hc] = ours->forward(x);
  auto [out_ref, hc_ref] = theirs->forward(x);
  EXPECT_TRUE(torch::equal(out, out_ref));
  EXPECT_TRUE(torch::equal(std::get<1>(hc), std::get<1>(hc_ref)));
  // Bit 10 of the path: torch's fused loop (not the fallback, bit 5).
  EXPECT_TRUE(((ours->last_stats().path & (int64_t(1) << 10)) != 0).all().item<bool>());
  EXPECT_FALSE(ours->last_stats().sequential().any().item<bool>());
}

TEST(CppApi, BadInputRaisesErrorsNamingTheArgument) {
  pnewton::nn::GRU gru(pnewton::nn::GRUOptions(3, 5));
  try {
    gru->forward(torch::randn({10, 2, 4}));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("input.size(-1) must be 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gru->forward(torch::randn({10, 2, 3}), torch::zeros({2, 2, 5})), c10::Error);
  EXPECT_THROW(pnewton::scan_diag(torch::rand({2, 5, 3}), torch::rand({2, 5, 4})), c10::Error);
  pnewton::SolverOptions bad;
  bad.method = "newton";
  EXPECT_THROW(pnewton::newton_rnn("gru", torch::randn({1, 4, 15}), torch::randn({15, 5}), std::nullopt,
                                   torch::zeros({1, 5}), bad),
               c10::Error);
  EXPECT_THROW(pnewton::nn::LSTM(pnewton::nn::LSTMOptions(3, 4).proj_size(4)), c10::Error);
}

}  // namespace

// The CUDA kernel's per-thread code (fused_cell_row_share and _finish, kernels/cell_fused.h,
// with the 32-bit offsets the kernels take where they fit), run on the host as the kernel
// runs a wide row (64 threads: each warp's 32 shares
// combined as the shuffles combine them into one of the row's two partial results),
// against the vectorised CPU pass of the ATen
// capability in use: the same F, J, R and row reductions for every cell and part, with
// padding and reset rows and a hidden size off the vector width; and the shifted reads of
// the iteration (each step reads the previous row, the entering state at t = 0, s0 at
// resets) against the same pass given those previous rows copied out. FusedPart::blocks:
// a multi-head cell's blocks, 7 heads of 3, from random head weights (as columns).
template <typename T>
void expect_mirrors_the_vector_pass(pnewton::FusedCell cell, pnewton::FusedPart part, bool diagonal_weights,
                                    double tol) {
  using namespace pnewton;
  using torch::indexing::Slice;
  torch::manual_seed(1);
  const int64_t B = 3, Tn = 10, N = B * Tn, D = 21, G = fused_gates(cell), S = cell == FusedCell::lstm ? 2 * D : D;
  const auto opts = torch::TensorOptions().dtype(std::is_same_v<T, float> ? torch::kFloat : torch::kDouble);
  const DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::f64;
  const auto gi = torch::randn({N, G * D}, opts), gh = torch::randn({N, G * D}, opts);
  const auto w = torch::randn({G * D}, opts), b = torch::randn({G * D}, opts) * 0.1;
  const auto s = torch::randn({N, S}, opts), current = torch::randn({N, S}, opts);
  const auto first = torch::randn({B, S}, opts), first_gh = torch::randn({B, G * D}, opts);
  const auto s0 = torch::randn({B, S}, opts), s0_gh = torch::randn({B, G * D}, opts);
  const auto padding = torch::arange(N) % 7 == 3, reset = torch::arange(N) % 5 == 1;
  const bool heads = part == FusedPart::blocks;
  const int64_t k = 3;
  const auto columns = torch::randn({G, k, D}, opts);  // FusedCellParams::heads
  // The rows the shifted reads stand for.
  auto previous = [&](const torch::Tensor& rows, const torch::Tensor& entering, const torch::Tensor& at_reset) {
    const auto r = rows.view({B, Tn, -1});
    auto prev = torch::cat({entering.unsqueeze(1), r.index({Slice(), Slice(0, Tn - 1)})}, 1);
    return torch::where(reset.view({B, Tn, 1}), at_reset.unsqueeze(1), prev).reshape({N, -1}).contiguous();
  };
  const auto prev_s = previous(current, first, s0), prev_gh = previous(gh, first_gh, s0_gh);
  const int64_t J_size = heads ? (cell == FusedCell::lstm ? 4 : 1) * D * k : part == FusedPart::block2 ? 4 * D : S;
  // unwritten_F: the thread code with shifted reads and no F asked for, as the solver's
  // iterations run it on CUDA.
  enum Variant { vector, thread, shifted, unwritten_F };
  std::vector<torch::Tensor> out[4];
  for (const Variant variant : {vector, thread, shifted, unwritten_F}) {
    const bool threads = variant == thread || variant == unwritten_F;
    FusedCellParams p;
    p.cell = cell, p.part = part, p.diagonal_weights = diagonal_weights, p.N = N, p.D = D;
    p.gi = gi.data_ptr(), p.b = b.data_ptr(), p.w = w.data_ptr(), p.current = current.data_ptr();
    p.padding = padding.data_ptr<bool>(), p.reset = reset.data_ptr<bool>();
    if (heads) p.heads = columns.data_ptr(), p.k = k;
    if (variant == shifted || variant == unwritten_F) {
      p.T = Tn, p.s = current.data_ptr(), p.gh = gh.data_ptr(), p.first = first.data_ptr(), p.s0 = s0.data_ptr();
      p.first_gh = first_gh.data_ptr(), p.s0_gh = s0_gh.data_ptr();
    } else {
      p.s = (variant == vector ? s : prev_s).data_ptr(), p.gh = (variant == vector ? gh : prev_gh).data_ptr();
    }
    if (diagonal_weights) p.gh = p.first_gh = p.s0_gh = nullptr;
    auto& o = out[variant];
    o = {torch::full({N, S}, NAN, opts), torch::full({N, J_size}, NAN, opts), torch::full({N, S}, NAN, opts)};
    p.F = variant == unwritten_F ? nullptr : o[0].data_ptr(), p.J = o[1].data_ptr(), p.R = o[2].data_ptr();
    constexpr int kWarp = 32, kParts = 2;
    const int64_t parts = threads ? kParts : 1;
    auto row_residual = torch::empty({N, parts}, opts), row_scale = torch::empty({N, parts}, opts);
    auto row_square = torch::empty({N, parts}, opts);
    p.row_residual = row_residual.data_ptr(), p.row_scale = row_scale.data_ptr(), p.row_square = row_square.data_ptr();
    p.row_parts = parts;
    if (threads) {
      for (int64_t n = 0; n < N; ++n) {
        for (int part = 0; part < kParts; ++part) {
          FusedRowShare<T> shares[kWarp];
          for (int lane = 0; lane < kWarp; ++lane) {
            shares[lane] = fused_cell_row_share<T, int32_t>(p, n, part * kWarp + lane, kParts * kWarp);
          }
          for (int offset = kWarp / 2; offset > 0; offset /= 2) {  // the shuffles' butterfly
            for (int lane = 0; lane < offset; ++lane) shares[lane].add(shares[lane + offset]);
          }
          fused_cell_row_finish<T, int32_t>(p, n, part, shares[0]);
        }
      }
    } else {
      cpu::fused_cell_cpu(p, dtype, 0, N);
    }
    row_residual = row_residual.amax(1), row_scale = row_scale.amax(1), row_square = row_square.sum(1);
    const auto masked = [&](const torch::Tensor& x) { return x.masked_fill(padding.unsqueeze(1), 0); };
    expect_close(row_residual, masked(o[2]).abs().amax(1), 0);
    expect_close(row_scale, masked(current).abs().amax(1), 0);  // the states' scale
    const auto square = masked(o[2]).square().sum(1);  // summed in another order: relative
    expect_close(row_square, square, (std::is_same_v<T, float> ? 1e-6 : 1e-14) * (1 + square.max().template item<double>()));
    if (part != FusedPart::none) EXPECT_EQ(o[1].index({reset}).abs().max().template item<double>(), 0.0);
    EXPECT_EQ(o[2].index({padding}).abs().max().template item<double>(), 0.0);
  }
  // The vector pass over the copied previous rows, for the shifted one.
  FusedCellParams p;
  p.cell = cell, p.part = part, p.diagonal_weights = diagonal_weights, p.N = N, p.D = D;
  p.gi = gi.data_ptr(), p.b = b.data_ptr(), p.w = w.data_ptr(), p.current = current.data_ptr();
  p.padding = padding.data_ptr<bool>(), p.reset = reset.data_ptr<bool>();
  p.s = prev_s.data_ptr(), p.gh = diagonal_weights ? nullptr : prev_gh.data_ptr();
  if (heads) p.heads = columns.data_ptr(), p.k = k;
  std::vector<torch::Tensor> copied{torch::full({N, S}, NAN, opts), torch::full({N, J_size}, NAN, opts),
                                    torch::full({N, S}, NAN, opts)};
  p.F = copied[0].data_ptr(), p.J = copied[1].data_ptr(), p.R = copied[2].data_ptr();
  cpu::fused_cell_cpu(p, dtype, 0, N);
  for (int k = 0; k < 3; ++k) {
    if (k == 1 && part == FusedPart::none) continue;
    expect_close(out[thread][k], copied[k], tol);    // thread code == vector pass
    expect_close(out[shifted][k], copied[k], 0);     // shifted reads == copied rows
    if (k > 0) expect_close(out[unwritten_F][k], copied[k], tol);
  }
  EXPECT_TRUE(out[unwritten_F][0].isnan().all().template item<bool>());  // F untouched
}

// The CUDA update's per-thread code against the vectorised CPU update: next = s + sign·x
// (non-finite reset to 0) on moving sequences, s elsewhere and on padding; max |x| per row.
template <typename T>
void expect_update_mirrors_the_vector_pass() {
  using namespace pnewton;
  torch::manual_seed(2);
  const int64_t B = 3, Tn = 7, N = B * Tn, S = 19;
  const auto opts = torch::TensorOptions().dtype(std::is_same_v<T, float> ? torch::kFloat : torch::kDouble);
  const DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::f64;
  auto s = torch::randn({N, S}, opts), x = torch::randn({N, S}, opts);
  x.index_put_({4, 2}, NAN), x.index_put_({9, 0}, INFINITY), s.index_put_({11, 3}, 1e308 * 1e308);
  const auto moving = torch::tensor({true, false, true}), padding = torch::arange(N) % 6 == 5;
  torch::Tensor next[2], step[2];
  for (int variant = 0; variant < 2; ++variant) {
    next[variant] = torch::full({N, S}, 7.0, opts), step[variant] = torch::full({N}, 7.0, opts);
    NewtonUpdateParams p;
    p.N = N, p.T = Tn, p.S = S, p.sign = -1;
    p.s = s.data_ptr(), p.x = x.data_ptr(), p.moving = moving.data_ptr<bool>(), p.padding = padding.data_ptr<bool>();
    p.next = next[variant].data_ptr(), p.row_step = step[variant].data_ptr();
    if (variant == 0) {
      cpu::newton_update_cpu(p, dtype, 0, N);
      continue;
    }
    constexpr int kLanes = 4;
    for (int64_t n = 0; n < N; ++n) {
      T largest = 0;
      for (int lane = 0; lane < kLanes; ++lane) largest = nan_max(largest, newton_update_row_share<T, int32_t>(p, n, lane, kLanes));
      newton_update_row_finish<T>(p, n, largest);
    }
  }
  EXPECT_TRUE(torch::equal(next[0], next[1]));
  EXPECT_TRUE(torch::equal(step[0].isnan(), step[1].isnan()));
  EXPECT_TRUE(torch::equal(step[0].nan_to_num(0), step[1].nan_to_num(0)));
  EXPECT_TRUE(step[1].isnan().any().item<bool>());  // the NaN step propagates
}

TEST(FusedCellPass, CudaUpdateThreadCodeMirrorsTheVectorisedCpuUpdate) {
  expect_update_mirrors_the_vector_pass<double>();
  expect_update_mirrors_the_vector_pass<float>();
}

TEST(FusedCellPass, CudaThreadCodeMirrorsTheVectorisedCpuPass) {
  using pnewton::FusedCell, pnewton::FusedPart;
  for (const auto& [cell, diagonal] : std::vector<std::pair<FusedCell, bool>>{
           {FusedCell::gru, false}, {FusedCell::gru, true}, {FusedCell::lstm, false}, {FusedCell::lstm, true},
           {FusedCell::rnn_tanh, false}, {FusedCell::rnn_relu, false}}) {
    std::vector<FusedPart> parts{FusedPart::none, FusedPart::diagonal};
    if (cell == FusedCell::lstm) parts.push_back(FusedPart::block2);
    if (!diagonal && (cell == FusedCell::gru || cell == FusedCell::lstm)) parts.push_back(FusedPart::blocks);
    for (const FusedPart part : parts) {
      SCOPED_TRACE(testing::Message() << "cell " << int(cell) << " diagonal " << diagonal << " part " << int(part));
      expect_mirrors_the_vector_pass<double>(cell, part, diagonal, 1e-13);
      expect_mirrors_the_vector_pass<float>(cell, part, diagonal, 2e-6);  // Sleef/ours vs libm
    }
  }
}

// The loop of a per-channel cell: the CUDA thread code (fused_loop_channel, one channel of a
// sequence through all its steps) and the vectorised CPU loop (fused_loop_cpu, 21 channels:
// a partial vector) against single steps of the vector pass (fused_cell_cpu without shifted
// reads, p.s the state carried by hand), from `first`, s0 at reset steps.
template <typename T>
void expect_loop_mirrors_single_steps(pnewton::FusedCell cell, double tol) {
  using namespace pnewton;
  torch::manual_seed(3);
  const int64_t B = 3, Tn = 40, N = B * Tn, D = 21, G = fused_gates(cell), S = cell == FusedCell::lstm ? 2 * D : D;
  const auto opts = torch::TensorOptions().dtype(std::is_same_v<T, float> ? torch::kFloat : torch::kDouble);
  const DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::f64;
  const auto gi = torch::randn({B, Tn, G * D}, opts), w = torch::randn({G * D}, opts) * 0.5;
  const auto b = torch::randn({G * D}, opts) * 0.1, first = torch::randn({B, S}, opts), s0 = torch::randn({B, S}, opts);
  const auto reset = (torch::arange(N) % 11 == 4).view({B, Tn});
  FusedCellParams p;
  p.cell = cell, p.part = FusedPart::none, p.diagonal_weights = true, p.N = N, p.D = D, p.T = Tn;
  p.gi = gi.data_ptr(), p.w = w.data_ptr(), p.b = b.data_ptr(), p.first = first.data_ptr(), p.s0 = s0.data_ptr();
  p.reset = reset.data_ptr<bool>();
  torch::Tensor thread = torch::full({B, Tn, S}, NAN, opts), vector = torch::full({B, Tn, S}, NAN, opts);
  p.F = thread.data_ptr();
  for (int64_t seq = 0; seq < B; ++seq) {
    for (int64_t d = 0; d < D; ++d) fused_loop_channel<T, int32_t>(p, seq, d);
  }
  p.F = vector.data_ptr();
  cpu::fused_loop_cpu(p, dtype, 0, B * ((D + cpu::kLoopChannels - 1) / cpu::kLoopChannels));
  // The reference: one step at a time.
  torch::Tensor steps = torch::empty({B, Tn, S}, opts), state = first.clone();
  for (int64_t t = 0; t < Tn; ++t) {
    state = torch::where(reset.select(1, t).unsqueeze(1), s0, state).contiguous();
    const auto gi_t = gi.select(1, t).contiguous();
    auto next = torch::empty({B, S}, opts);
    FusedCellParams q;
    q.cell = cell, q.part = FusedPart::none, q.diagonal_weights = true, q.N = B, q.D = D;
    q.gi = gi_t.data_ptr(), q.w = w.data_ptr(), q.b = b.data_ptr(), q.s = state.data_ptr(), q.F = next.data_ptr();
    cpu::fused_cell_cpu(q, dtype, 0, B);
    steps.select(1, t).copy_(next);
    state = next;
  }
  EXPECT_FALSE(thread.isnan().any().item<bool>());
  expect_close(vector, steps, tol);
  expect_close(thread, steps, tol);
}

TEST(FusedCellPass, PerChannelLoopMatchesSingleSteps) {
  for (const pnewton::FusedCell cell : {pnewton::FusedCell::gru, pnewton::FusedCell::lstm}) {
    SCOPED_TRACE(testing::Message() << "cell " << int(cell));
    expect_loop_mirrors_single_steps<double>(cell, 1e-13);
    expect_loop_mirrors_single_steps<float>(cell, 2e-6);
  }
}

// The CUDA VJP's per-thread code (fused_vjp_row_share), run on the host as the kernel runs
// it (rows split into shares of 4 threads), against autograd through torch's own cells
// (torch::gru_cell, lstm_cell, rnn_*_cell with W_ih = I, so that their input is gi): the
// cotangents of gi, of the previous state (the pass's direct part plus grad_gh W_hh for
// dense weights) and of W_hh and b_hh (Σ_n grad_gh ⊗ h and Σ_n grad_gh). Per-channel
// weights as the dense W_hh whose gate blocks are diag(w_k).
template <typename T>
void expect_vjp_mirrors_autograd(pnewton::FusedCell cell, bool diagonal_weights, double tol) {
  using namespace pnewton;
  torch::manual_seed(3);
  const int64_t N = 13, D = 11, G = fused_gates(cell);
  const bool lstm = cell == FusedCell::lstm;
  const int64_t S = lstm ? 2 * D : D;
  const auto opts = torch::TensorOptions().dtype(std::is_same_v<T, float> ? torch::kFloat : torch::kDouble);
  const auto gi = torch::randn({N, G * D}, opts), b = torch::randn({G * D}, opts) * 0.1;
  const auto w = torch::randn({G * D}, opts) * 0.5;
  std::vector<torch::Tensor> blocks;  // diag(w_k), the dense form of per-channel weights
  for (const auto& wk : w.view({G, D}).unbind(0)) blocks.push_back(torch::diag(wk));
  const auto W = diagonal_weights ? torch::cat(blocks, 0) : torch::randn({G * D, D}, opts) * 0.3;
  const auto s = torch::randn({N, S}, opts), v = torch::randn({N, S}, opts);
  // The pass's outputs.
  const auto h = lstm ? s.view({N, D, 2}).select(2, 0).contiguous() : s;
  const auto gh = torch::mm(h, W.t());  // W_hh h without b_hh
  auto grad_gi = torch::full({N, G * D}, NAN, opts), grad_gh = torch::full({N, G * D}, NAN, opts);
  auto grad_s = torch::full({N, S}, NAN, opts);
  FusedVjpParams p;
  p.cell = cell, p.diagonal_weights = diagonal_weights, p.N = N, p.D = D;
  p.gi = gi.data_ptr(), p.gh = diagonal_weights ? nullptr : gh.data_ptr(), p.b = b.data_ptr();
  p.w = diagonal_weights ? w.data_ptr() : nullptr, p.s = s.data_ptr(), p.v = v.data_ptr();
  p.grad_gi = grad_gi.data_ptr(), p.grad_s = grad_s.data_ptr();
  p.grad_gh = cell == FusedCell::gru ? grad_gh.data_ptr() : nullptr;
  constexpr int kLanes = 4;
  for (int64_t n = 0; n < N; ++n) {
    for (int lane = 0; lane < kLanes; ++lane) fused_vjp_row_share<T, int32_t>(p, n, lane, kLanes);
  }
  if (cell != FusedCell::gru) grad_gh = grad_gi;
  const auto grad_h_total = diagonal_weights ? (lstm ? grad_s.view({N, D, 2}).select(2, 0) : grad_s)
                                             : (lstm ? grad_s.view({N, D, 2}).select(2, 0) : grad_s) +
                                                   torch::mm(grad_gh, W);
  // Autograd through torch's cell.
  const auto x = gi.clone().requires_grad_(true), W_hh = W.clone().requires_grad_(true);
  const auto b_hh = b.clone().requires_grad_(true), h0 = h.clone().requires_grad_(true);
  const auto eye = torch::eye(G * D, opts), zero = torch::zeros({G * D}, opts);
  torch::Tensor loss, c0;
  if (lstm) {
    c0 = s.view({N, D, 2}).select(2, 1).contiguous().requires_grad_(true);
    const auto out = torch::lstm_cell(x, {h0, c0}, eye, W_hh, zero, b_hh);
    const auto vv = v.view({N, D, 2});
    loss = (std::get<0>(out) * vv.select(2, 0)).sum() + (std::get<1>(out) * vv.select(2, 1)).sum();
  } else if (cell == FusedCell::gru) {
    loss = (torch::gru_cell(x, h0, eye, W_hh, zero, b_hh) * v).sum();
  } else if (cell == FusedCell::rnn_tanh) {
    loss = (torch::rnn_tanh_cell(x, h0, eye, W_hh, zero, b_hh) * v).sum();
  } else {
    loss = (torch::rnn_relu_cell(x, h0, eye, W_hh, zero, b_hh) * v).sum();
  }
  loss.backward();
  expect_close(grad_gi, x.grad(), tol);
  expect_close(grad_h_total, h0.grad(), tol);
  if (lstm) expect_close(grad_s.view({N, D, 2}).select(2, 1), c0.grad(), tol);
  expect_close(grad_gh.sum(0), b_hh.grad(), tol);
  if (!diagonal_weights) expect_close(torch::mm(grad_gh.t(), h), W_hh.grad(), tol);
  if (diagonal_weights) {  // the diagonals of W_hh's gate blocks
    const auto per_channel = (grad_gh.view({N, G, D}) * h.unsqueeze(1)).sum(0).view({G * D});
    expect_close(per_channel, W_hh.grad().view({G, D, D}).diagonal(0, 1, 2).reshape({G * D}), tol);
  }
}

TEST(FusedCellPass, CudaVjpThreadCodeMatchesAutogradThroughTorchsCells) {
  using pnewton::FusedCell;
  for (const auto& [cell, diagonal] : std::vector<std::pair<FusedCell, bool>>{
           {FusedCell::gru, false}, {FusedCell::gru, true}, {FusedCell::lstm, false}, {FusedCell::lstm, true},
           {FusedCell::rnn_tanh, false}, {FusedCell::rnn_relu, false}}) {
    SCOPED_TRACE(testing::Message() << "cell " << int(cell) << " diagonal " << diagonal);
    expect_vjp_mirrors_autograd<double>(cell, diagonal, 1e-12);
    expect_vjp_mirrors_autograd<float>(cell, diagonal, 1e-5);
  }
}
