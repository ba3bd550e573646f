#include "csrc/solver/elk.h"

#include <torch/library.h>

#include "csrc/checks.h"
#include "csrc/distributed/time_shards.h"
#include "pnewton/scan.h"

namespace pnewton {
namespace {

// [0, x_1, ..., x_{T−1}]: what step t reads from the step before it (time shards: the
// previous shard's last step first); x_{t+1} with `fill` after the end.
at::Tensor previous(const at::Tensor& x, TimeShards* shards = nullptr) { return shift_in_time(x, false, 0.0, shards); }
at::Tensor next(const at::Tensor& x, double fill, TimeShards* shards) { return shift_in_time(x, true, fill, shards); }

// A⁻¹B, never raising: a singular A (a diverged iterate's covariances) gives non-finite
// values, which make the step non-finite and the trust region reject it.
at::Tensor solve(const at::Tensor& A, const at::Tensor& B) { return std::get<0>(at::linalg_solve_ex(A, B)); }

// The element (a, c, j) of Särkkä & García-Fernández for an earlier i followed by a later j.
std::tuple<at::Tensor, at::Tensor, at::Tensor> combine(const at::Tensor& ai, const at::Tensor& ci, const at::Tensor& ji,
                                                       const at::Tensor& aj, const at::Tensor& cj, const at::Tensor& jj) {
  const at::Tensor w = 1.0 / (1.0 + ci * jj);
  return {aj * ai * w, aj * aj * ci * w + cj, ai * ai * jj * w + ji};
}

// Per-channel (scalar) Kalman covariances P_t [B, T, S] for transitions a [B, T, S].
// Elements (a, c, j) of Särkkä & García-Fernández with H = Q = I, R = I/λ; combining an
// earlier element i with a later j:
//   a = a_j a_i / (1 + c_i j_j),  c = a_j² c_i / (1 + c_i j_j) + c_j,  j = a_i² j_j / (1 + c_i j_j) + j_i.
// Every denominator is ≥ 1 and c ≤ 1/λ: no overflow, unlike a scan of 2×2 Möbius matrices.
// Time shards: the same scan per shard, one gather of every shard's total element, the
// fold of the earlier ones, combined with each local prefix.
at::Tensor scalar_covariances(const at::Tensor& f, const at::Tensor& lam, TimeShards* shards) {
  const int64_t B = f.size(0), T = f.size(1), S = f.size(2);
  const at::Tensor inv = 1.0 / (1.0 + lam);  // [B, 1, 1]
  at::Tensor a = f * inv, c = inv.expand_as(f).contiguous(), j = lam * inv * f * f;
  if (T > 0 && (!shards || shards->offset() == 0)) {
    a.narrow(1, 0, 1).zero_();  // the first step starts from the exactly known δ_0 = 0
    j.narrow(1, 0, 1).zero_();
  }
  for (int64_t d = 1; d < T; d *= 2) {
    const int64_t n = T - d;
    auto [a2, c2, j2] = combine(a.narrow(1, 0, n), c.narrow(1, 0, n), j.narrow(1, 0, n), a.narrow(1, d, n),
                                c.narrow(1, d, n), j.narrow(1, d, n));
    a = at::cat({a.narrow(1, 0, d), a2}, 1);
    c = at::cat({c.narrow(1, 0, d), c2}, 1);
    j = at::cat({j.narrow(1, 0, d), j2}, 1);
  }
  if (!shards) return c;
  const at::Tensor none = at::zeros({3, B, S}, f.options());
  const at::Tensor totals = shards->gather(T > 0 ? at::stack({a.select(1, T - 1), c.select(1, T - 1), j.select(1, T - 1)})
                                                 : none);
  at::Tensor ea, ec, ej;  // the earlier shards' element (none before the first)
  for (int64_t q = 0; q < shards->position(); ++q) {
    if (shards->length(q) == 0) continue;
    const at::Tensor t = totals[q];
    if (!ea.defined()) {
      ea = t[0], ec = t[1], ej = t[2];
    } else {
      std::tie(ea, ec, ej) = combine(ea, ec, ej, t[0], t[1], t[2]);
    }
  }
  if (!ea.defined() || T == 0) return c;
  return std::get<1>(combine(ea.unsqueeze(1), ec.unsqueeze(1), ej.unsqueeze(1), a, c, j));
}

at::Tensor scalar_step(const at::Tensor& f, const at::Tensor& r, const at::Tensor& lambda, bool smooth,
                       TimeShards* shards) {
  const int64_t B = f.size(0), T = f.size(1);
  const at::Tensor lam = lambda.to(f.scalar_type()).view({B, 1, 1});
  const at::Tensor P = scalar_covariances(f, lam, shards);
  const at::Tensor P_pred = f * f * previous(P, shards) + 1.0;  // P⁻_t = a_t² P_{t−1} + 1
  const at::Tensor gain = 1.0 / (1.0 + lam * P_pred);           // 1 − K_t
  // m_t = (1 − K_t)(a_t m_{t−1} − r_t)
  const at::Tensor m = shards ? sharded_scan_diag(*shards, gain * f, -gain * r, std::nullopt, false)
                              : scan_diag(gain * f, -gain * r);
  if (!smooth) return m;
  if (shards) {
    // The smoother over the whole sequence: the next step's f, P⁻ and r (G = 0 after the end).
    const at::Tensor f_next = next(f, 0.0, shards), P_pred_next = next(P_pred, 1.0, shards);
    const at::Tensor G = P * f_next / P_pred_next;
    const at::Tensor offset = m - G * (f_next * m - next(r, 0.0, shards));
    return sharded_scan_diag(*shards, G, offset, std::nullopt, /*reverse=*/true);
  }
  if (T == 1) return m;
  // m^s_t = m_t + G_t (m^s_{t+1} − m⁻_{t+1}),  G_t = P_t a_{t+1} / P⁻_{t+1},  m^s_T = m_T.
  const int64_t n = T - 1;
  const at::Tensor f_next = f.narrow(1, 1, n), m_head = m.narrow(1, 0, n);
  const at::Tensor G = P.narrow(1, 0, n) * f_next / P_pred.narrow(1, 1, n);
  const at::Tensor offset = m_head - G * (f_next * m_head - r.narrow(1, 1, n));
  const at::Tensor head = scan_diag(G, offset, m.select(1, n), /*reverse=*/true);
  return at::cat({head, m.narrow(1, n, 1)}, 1);
}

// The same for k×k blocks: f [B, T, H, k, k], r [B, T, H, k].
at::Tensor symmetric(const at::Tensor& m) { return 0.5 * (m + m.transpose(-1, -2)); }

at::Tensor block_covariances(const at::Tensor& f, const at::Tensor& lam, const at::Tensor& eye) {
  const int64_t T = f.size(1);
  const at::Tensor inv = 1.0 / (1.0 + lam);  // [B, 1, 1, 1, 1]
  at::Tensor a = f * inv, c = (eye * inv).expand_as(f).contiguous(),
             j = lam * inv * at::matmul(f.transpose(-1, -2), f);
  a.narrow(1, 0, 1).zero_();
  j.narrow(1, 0, 1).zero_();
  const int64_t k = f.size(-1);
  for (int64_t d = 1; d < T; d *= 2) {
    const int64_t n = T - d;
    const at::Tensor ai = a.narrow(1, 0, n), ci = c.narrow(1, 0, n), ji = j.narrow(1, 0, n);
    const at::Tensor aj = a.narrow(1, d, n), cj = c.narrow(1, d, n), jj = j.narrow(1, d, n);
    const at::Tensor den = eye + at::matmul(ci, jj);  // I + C_i J_j
    const at::Tensor x = solve(den, at::cat({ai, ci}, -1));
    const at::Tensor a2 = at::matmul(aj, x.narrow(-1, 0, k));
    const at::Tensor c2 = symmetric(at::matmul(at::matmul(aj, x.narrow(-1, k, k)), aj.transpose(-1, -2)) + cj);
    const at::Tensor z = solve(den.transpose(-1, -2), at::matmul(jj, ai));
    const at::Tensor j2 = symmetric(at::matmul(ai.transpose(-1, -2), z) + ji);
    a = at::cat({a.narrow(1, 0, d), a2}, 1);
    c = at::cat({c.narrow(1, 0, d), c2}, 1);
    j = at::cat({j.narrow(1, 0, d), j2}, 1);
  }
  return c;
}

at::Tensor block_step(const at::Tensor& f, const at::Tensor& r, const at::Tensor& lambda, bool smooth) {
  const int64_t B = f.size(0), T = f.size(1), k = f.size(-1);
  const at::Tensor lam = lambda.to(f.scalar_type()).view({B, 1, 1, 1, 1});
  const at::Tensor eye = at::eye(k, f.options());
  const at::Tensor P = block_covariances(f, lam, eye);
  const at::Tensor P_pred = at::matmul(at::matmul(f, previous(P)), f.transpose(-1, -2)) + eye;
  // (I − K_t) = (I + λ P⁻_t)⁻¹ applied to both a_t and r_t at once.
  const at::Tensor g = solve(eye + lam * P_pred, at::cat({f, r.unsqueeze(-1)}, -1));
  const at::Tensor m = scan_block(g.narrow(-1, 0, k).contiguous(), -g.select(-1, k));
  if (!smooth || T == 1) return m;
  const int64_t n = T - 1;
  const at::Tensor f_next = f.narrow(1, 1, n), m_head = m.narrow(1, 0, n);
  // G_t = P_t a_{t+1}ᵀ (P⁻_{t+1})⁻¹ = ((P⁻_{t+1})⁻¹ a_{t+1} P_t)ᵀ for symmetric P, P⁻.
  const at::Tensor G =
      solve(P_pred.narrow(1, 1, n), at::matmul(f_next, P.narrow(1, 0, n))).transpose(-1, -2).contiguous();
  const at::Tensor m_pred = at::matmul(f_next, m_head.unsqueeze(-1)).squeeze(-1) - r.narrow(1, 1, n);
  const at::Tensor offset = m_head - at::matmul(G, m_pred.unsqueeze(-1)).squeeze(-1);
  const at::Tensor head = scan_block(G, offset, m.select(1, n), /*reverse=*/true);
  return at::cat({head, m.narrow(1, n, 1)}, 1);
}

}  // namespace

at::Tensor elk_delta(const at::Tensor& a, const at::Tensor& r, const at::Tensor& lambda, int64_t k, bool smooth,
                     TimeShards* shards) {
  const int64_t B = r.size(0), T = r.size(1), S = r.size(2);
  TORCH_INTERNAL_ASSERT(!shards || k == 1);  // the ops refuse the others
  if (shards) return scalar_step(a, r, lambda, smooth, shards);
  if (T == 0) return at::zeros_like(r);
  if (k == 1) return scalar_step(a, r, lambda, smooth, nullptr);
  return block_step(a.view({B, T, S / k, k, k}), r.view({B, T, S / k, k}), lambda, smooth).view({B, T, S});
}

at::Tensor apply_approximation(const at::Tensor& a, const at::Tensor& x, int64_t k, TimeShards* shards) {
  const at::Tensor xp = previous(x, shards);
  const int64_t B = x.size(0), T = x.size(1), S = x.size(2);
  if (k == 1) return a * xp;
  return at::matmul(a.view({B, T, S / k, k, k}), xp.view({B, T, S / k, k, 1})).view({B, T, S});
}

namespace {

constexpr const char* kOp = "pnewton.elk_step";

// Checks the arguments (no data read: the meta kernel runs it); true for a diagonal a.
bool checked_elk_args(const at::Tensor& a, const at::Tensor& r, const at::Tensor& lam) {
  check_floating(kOp, "r", r, 3, "[B, T, S]");
  TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble, kOp, ": r must be float32 or float64, got ",
              r.scalar_type());
  check_floating(kOp, "a", a);
  check_like(kOp, "a", a, r, "r");
  check_floating(kOp, "lam", lam, 1, "[B]");
  check_like(kOp, "lam", lam, r, "r", /*same_dtype=*/false);
  const bool diag = a.dim() == 3 && a.sym_sizes() == r.sym_sizes();
  const bool dense = a.dim() == 4 && a.sym_sizes().slice(0, 3) == r.sym_sizes() && a.sym_size(3) == r.sym_size(2);
  TORCH_CHECK(diag || dense, kOp, ": a must be the diagonal [B, T, S] or the dense [B, T, S, S] approximation with ",
              "[B, T, S] = ", r.sym_sizes(), ", got shape ", a.sym_sizes());
  check_shape(kOp, "lam", lam, {r.sym_size(0)}, "[B]");
  return diag;
}

at::Tensor elk_step_op(const at::Tensor& a, const at::Tensor& r, const at::Tensor& lam, bool smooth) {
  const bool diag = checked_elk_args(a, r, lam);
  const int64_t B = r.size(0);
  TORCH_CHECK(B == 0 || (lam > 0).all().item<bool>(), kOp, ": lam must be > 0 (lam -> 0 is the Newton step)");
  if (B == 0) return at::zeros_like(r);
  return elk_delta(a, r, lam, diag ? 1 : r.size(2), smooth);
}

at::Tensor elk_step_meta(const at::Tensor& a, const at::Tensor& r, const at::Tensor& lam, bool /*smooth*/) {
  checked_elk_args(a, r, lam);
  return at::empty_like(r, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CompositeExplicitAutograd, m) { m.impl("elk_step", &elk_step_op); }
TORCH_LIBRARY_IMPL(pnewton, Meta, m) { m.impl("elk_step", &elk_step_meta); }

}  // namespace pnewton
