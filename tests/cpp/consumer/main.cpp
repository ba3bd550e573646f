// Uses pnewton from an installed package: a GRU against torch::nn::GRU on the same weights.
#include <torch/torch.h>

#include <cstdio>

#include <pnewton/pnewton.h>

int main() {
  torch::manual_seed(0);
  pnewton::nn::GRU ours(pnewton::nn::GRUOptions(2, 4));
  torch::nn::GRU theirs(torch::nn::GRUOptions(2, 4));
  {
    torch::NoGradGuard no_grad;
    auto src = ours->named_parameters();
    for (auto& p : theirs->named_parameters()) p.value().copy_(src[p.key()]);
  }
  const auto x = torch::randn({50, 3, 2});
  const double diff = (std::get<0>(ours->forward(x)) - std::get<0>(theirs->forward(x))).abs().max().item<double>();
  std::printf("consumer: max |pnewton - torch::nn| = %.2e\n", diff);
  return diff < 1e-4 ? 0 : 1;
}
