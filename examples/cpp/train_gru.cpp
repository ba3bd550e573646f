// Trains a pnewton::nn::GRU from LibTorch on a generated task and compares it with
// torch::nn::GRU on the same weights.
//
//   train_gru [steps=300] [T=128]
//
// Task: noisy ±1 bits in, a leaky running average of the clean bits out
// (y_t = 0.9 y_{t-1} + 0.1 b_t). Exits non-zero if the loss does not fall or the two GRUs
// disagree, so ctest runs it as a test.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

#include <pnewton/pnewton.h>

struct ModelImpl : torch::nn::Module {
  explicit ModelImpl(int64_t hidden)
      : rnn(register_module("rnn", pnewton::nn::GRU(pnewton::nn::GRUOptions(1, hidden).batch_first(true)))),
        head(register_module("head", torch::nn::Linear(hidden, 1))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head(std::get<0>(rnn->forward(x))); }
  pnewton::nn::GRU rnn;
  torch::nn::Linear head;
};
TORCH_MODULE(Model);

std::pair<torch::Tensor, torch::Tensor> make_batch(int64_t B, int64_t T) {
  const auto bits = torch::randint(0, 2, {B, T, 1}).to(torch::kFloat) * 2 - 1;
  const auto noisy = bits + 0.5 * torch::randn({B, T, 1});
  const auto target = pnewton::scan_diag(torch::full({B, T, 1}, 0.9), 0.1 * bits);
  return {noisy, target};
}

int main(int argc, char** argv) {
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300, T = argc > 2 ? std::atoll(argv[2]) : 128;
  torch::manual_seed(0);
  Model model(16);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  std::printf("training pnewton::nn::GRU(1, 16) with method auto on T=%lld for %lld steps\n",
              static_cast<long long>(T), static_cast<long long>(steps));
  double first = 0, last = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    auto [x, y] = make_batch(16, T);
    const auto loss = (model->forward(x) - y).square().mean();
    opt.zero_grad();
    loss.backward();
    opt.step();
    last = loss.item<double>();
    if (step == 1) first = last;
    if (step == 1 || step % (steps / 10 > 0 ? steps / 10 : 1) == 0) {
      const auto& stats = model->rnn->last_stats();
      std::printf("  step %4lld  loss %.4e  newton iterations %lld\n", static_cast<long long>(step), last,
                  static_cast<long long>(stats.iterations.max().item<int64_t>()));
    }
  }
  torch::nn::GRU reference(torch::nn::GRUOptions(1, 16).batch_first(true));
  {
    torch::NoGradGuard no_grad;
    auto ours = model->rnn->named_parameters();
    for (auto& p : reference->named_parameters()) p.value().copy_(ours[p.key()]);
  }
  auto [x, y] = make_batch(4, T);
  torch::NoGradGuard no_grad;
  const double diff = (std::get<0>(model->rnn->forward(x)) - std::get<0>(reference->forward(x))).abs().max().item<double>();
  std::printf("loss %.4e -> %.4e; max |pnewton - torch::nn::GRU| = %.2e\n", first, last, diff);
  const bool ok = last < 0.5 * first && diff < 1e-3;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
