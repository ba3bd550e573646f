// The sharded scans (csrc/distributed/time_shards.h) and the ops over them, scan_diag_sharded
// and scan_block_sharded: the same checks as the scan ops, one agreement of the shapes
// across the ranks, then the local scans and one gather of the shards' summaries.
#include <torch/library.h>

#include "csrc/checks.h"
#include "csrc/distributed/time_shards.h"
#include "csrc/scan.h"
#include "pnewton/scan.h"

namespace pnewton {

namespace {

// The composed transition of a shard in block form M [B, T, H, k, k] (x_t = M_t x_{t∓1}):
// M_T ⋯ M_1 forwards, M_1 ⋯ M_T in reverse, by a tree of batched matmuls (O(T·k³)).
at::Tensor composed_transition(at::Tensor M, bool reverse) {
  while (M.size(1) > 1) {
    if (M.size(1) % 2) {
      const at::Tensor eye = at::eye(M.size(-1), M.options()).expand({M.size(0), 1, M.size(2), M.size(3), M.size(4)});
      M = at::cat({M, eye}, 1);
    }
    const at::Tensor even = M.slice(1, 0, M.size(1), 2), odd = M.slice(1, 1, M.size(1), 2);
    M = reverse ? at::matmul(even, odd) : at::matmul(odd, even);
  }
  return M.select(1, 0);
}

// The fold's precision: at least fp32, whatever the operands are stored in.
at::ScalarType fold_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor sharded_scan_block(TimeShards& shards, const at::Tensor& A, const at::Tensor& b,
                              const std::optional<at::Tensor>& x0, bool reverse, bool transpose) {
  const int64_t B = b.size(0), T = b.size(1), H = b.size(2), k = b.size(3);
  const at::ScalarType type = fold_type(b.scalar_type());
  // This shard as an affine map of the state entering it: x_exit = Φ x_enter + ξ.
  at::Tensor phi, xi, local;
  if (T > 0) {
    local = scan_block(A, b, std::nullopt, reverse, transpose);
    xi = local.select(1, reverse ? 0 : T - 1);
    const at::Tensor M = A.to(type);  // fp16/bf16: composed in fp32 (a product of T_r steps)
    phi = composed_transition(transpose ? M.transpose(-1, -2) : M, reverse);
  } else {
    // The identity map; sums over the empty shard (exact zeros) keep it in the inputs' graph,
    // so that this rank's output is differentiable like every other rank's.
    xi = b.sum(1);
    phi = at::eye(k, b.options()) + A.sum(1);
  }
  const at::Tensor maps = shards.gather(at::cat({phi.flatten(1), xi.flatten(1)}, 1).to(type));
  // The state entering this shard: the shards before it in the scan's direction, folded.
  at::Tensor enter = x0.has_value() ? x0->to(type) : at::zeros({B, H, k}, b.options().dtype(type));
  const int64_t P = shards.count(), here = shards.position();
  bool first = !x0.has_value();  // no state enters: the local scan is the answer
  for (int64_t i = 0; i < P; ++i) {
    const int64_t q = reverse ? P - 1 - i : i;
    if (q == here) break;
    if (shards.length(q) == 0) continue;
    first = false;
    const at::Tensor m = maps.select(0, q);
    const at::Tensor phi_q = m.narrow(1, 0, H * k * k).view({B, H, k, k});
    const at::Tensor xi_q = m.narrow(1, H * k * k, H * k).view({B, H, k});
    enter = at::matmul(phi_q, enter.unsqueeze(-1)).squeeze(-1) + xi_q;
  }
  if (T == 0) return tie(at::empty({B, 0, H, k}, b.options()), maps);
  return tie(first ? local : scan_block(A, b, enter.to(b.scalar_type()), reverse, transpose), maps);
}

at::Tensor sharded_scan_diag(TimeShards& shards, const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& x0, bool reverse) {
  const int64_t B = b.size(0), T = b.size(1), D = b.size(2);
  const at::ScalarType type = fold_type(b.scalar_type());
  at::Tensor phi, xi, local;
  if (T > 0) {
    local = scan_diag(a, b, std::nullopt, reverse);
    xi = local.select(1, reverse ? 0 : T - 1);
    phi = a.to(type).prod(1);  // fp16/bf16: in fp32 (a product of T_r steps)
  } else {
    xi = b.sum(1);  // the identity map, in the inputs' graph (as for the block scan)
    phi = a.sum(1) + 1;
  }
  const at::Tensor maps = shards.gather(at::stack({phi, xi}).to(type));  // [P, 2, B, D]
  at::Tensor enter = x0.has_value() ? x0->to(type) : at::zeros({B, D}, b.options().dtype(type));
  const int64_t P = shards.count(), here = shards.position();
  bool first = !x0.has_value();
  for (int64_t i = 0; i < P; ++i) {
    const int64_t q = reverse ? P - 1 - i : i;
    if (q == here) break;
    if (shards.length(q) == 0) continue;
    enter = maps[q][0] * enter + maps[q][1];
    first = false;
  }
  if (T == 0) return tie(at::empty({B, 0, D}, b.options()), maps);
  return tie(first ? local : scan_diag(a, b, enter.to(b.scalar_type()), reverse), maps);
}

namespace {

// What every rank must agree on: the sizes but T (index 1), the dtype, the options.
std::vector<int64_t> descriptor(const at::Tensor& b, const std::optional<at::Tensor>& x0, bool reverse,
                                bool transpose) {
  std::vector<int64_t> d(b.sizes().begin(), b.sizes().end());
  d.push_back(static_cast<int64_t>(b.scalar_type()));
  d.push_back(x0.has_value());
  d.push_back(reverse);
  d.push_back(transpose);
  return d;
}

at::Tensor scan_diag_sharded(const at::Tensor& a, const at::Tensor& b, c10::string_view group,
                             const std::optional<at::Tensor>& x0, bool reverse) {
  constexpr const char* op = "pnewton.scan_diag_sharded";
  const std::string error = failed_checks([&] { check_diag_args(op, a, b, x0); });  // raised on every rank
  TimeShards shards(std::string(group), false);
  shards.agree(op, error.empty() ? descriptor(b, x0, reverse, false) : std::vector<int64_t>{}, 1, b, error);
  return sharded_scan_diag(shards, a, b, x0, reverse);
}

at::Tensor scan_block_sharded(const at::Tensor& A, const at::Tensor& b, c10::string_view group,
                              const std::optional<at::Tensor>& x0, bool reverse, bool transpose) {
  constexpr const char* op = "pnewton.scan_block_sharded";
  const std::string error = failed_checks([&] { check_block_args(op, A, b, x0); });  // raised on every rank
  TimeShards shards(std::string(group), false);
  shards.agree(op, error.empty() ? descriptor(b, x0, reverse, transpose) : std::vector<int64_t>{}, 1, b, error);
  return sharded_scan_block(shards, A, b, x0, reverse, transpose);
}

}  // namespace

// Composite: autograd differentiates the local scans, the fold and the gather.
TORCH_LIBRARY_IMPL(pnewton, CompositeImplicitAutograd, m) {
  m.impl("scan_diag_sharded", &scan_diag_sharded);
  m.impl("scan_block_sharded", &scan_block_sharded);
}

}  // namespace pnewton
