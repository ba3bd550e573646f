#include "csrc/solver/newton.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "pnewton/scan.h"

namespace pnewton {
namespace {

// The previous state of every step: [s0, s_1, ..., s_{T-1}].
at::Tensor shifted(const at::Tensor& s0, const at::Tensor& s) {
  return at::cat({s0.unsqueeze(1), s.narrow(1, 0, s.size(1) - 1)}, 1);
}

// [B, T, ...] -> [B·T, ...]: every step of every sequence as one row.
at::Tensor flat(const at::Tensor& x) { return x.flatten(0, 1); }

// Clip a Jacobian approximation: entries (diagonal) or blocks by their Frobenius norm,
// which bounds the spectral norm, so every clipped step is a contraction when clip < 1.
at::Tensor clip_jacobian(const at::Tensor& a, JacobianPart part, double clip) {
  if (part == JacobianPart::diagonal) return a.clamp(-clip, clip);
  const at::Tensor norm = at::linalg_matrix_norm(a, "fro").unsqueeze(-1).unsqueeze(-1);
  return a * at::clamp_max(clip / norm.clamp_min(1e-30), 1.0);
}

// δ solving δ_t = Ã_t δ_{t-1} − r_t, δ_0 = 0, for Ã in the given part.
at::Tensor newton_delta(const at::Tensor& a, const at::Tensor& r, JacobianPart part, int64_t D) {
  const int64_t B = r.size(0), T = r.size(1);
  switch (part) {
    case JacobianPart::diagonal: return scan_diag(a, -r);
    case JacobianPart::block2: return scan_block(a, -r.view({B, T, D, 2})).view({B, T, 2 * D});
    case JacobianPart::dense: return scan_block(a.unsqueeze(2), -r.unsqueeze(2)).squeeze(2);
  }
  return r;
}

JacobianPart method_part(const CellFunction& cell, Method method) {
  switch (method) {
    case Method::deer: return cell.structure();
    case Method::block_deer:
      TORCH_CHECK(cell.has_blocks(), "pnewton: method 'block_deer' needs an lstm, diag_lstm or other cell with 2x2 "
                  "blocks of state pairs");
      return JacobianPart::block2;
    default: return JacobianPart::diagonal;
  }
}

}  // namespace

Method parse_method(const std::string& name) {
  if (name == "deer") return Method::deer;
  if (name == "quasi_deer") return Method::quasi_deer;
  if (name == "block_deer") return Method::block_deer;
  if (name == "picard") return Method::picard;
  if (name == "jacobi") return Method::jacobi;
  if (name == "sequential") return Method::sequential;
  TORCH_CHECK(false, "pnewton.newton_rnn: method must be one of deer, quasi_deer, block_deer, picard, jacobi, ",
              "sequential; got '", name, "'");
}

Adjoint parse_adjoint(const std::string& name) {
  if (name == "auto") return Adjoint::automatic;
  if (name == "scan") return Adjoint::scan;
  if (name == "iterative") return Adjoint::iterative;
  if (name == "sequential") return Adjoint::sequential;
  TORCH_CHECK(false, "pnewton.newton_rnn: adjoint must be one of auto, scan, iterative, sequential; got '", name, "'");
}

SolverOptions solver_options(c10::string_view method, int64_t max_iter, double atol, double rtol, double damping,
                             double clip, c10::string_view init, bool fixed_iterations, bool fallback,
                             c10::string_view adjoint) {
  SolverOptions o;
  o.method = std::string(method);
  o.max_iter = max_iter;
  o.atol = atol;
  o.rtol = rtol;
  o.damping = damping;
  o.clip = clip;
  o.init = std::string(init);
  o.fixed_iterations = fixed_iterations;
  o.fallback = fallback;
  o.adjoint = std::string(adjoint);
  return o;
}

NewtonOptions newton_options(const SolverOptions& s) {
  const char* op = "pnewton";
  parse_adjoint(s.adjoint);  // checked here, used by the backward
  TORCH_CHECK(s.max_iter >= -1, op, ": max_iter must be >= 0 (or -1 for the default), got ", s.max_iter);
  TORCH_CHECK(!s.fixed_iterations || s.max_iter >= 0, op, ": fixed_iterations needs an explicit max_iter >= 0");
  TORCH_CHECK(s.atol >= 0 || s.atol == -1.0, op, ": atol must be >= 0, got ", s.atol);
  TORCH_CHECK(s.rtol >= 0 || s.rtol == -1.0, op, ": rtol must be >= 0, got ", s.rtol);
  TORCH_CHECK(s.damping >= 0 && s.damping < 1, op, ": damping must be in [0, 1), got ", s.damping);
  TORCH_CHECK(s.clip >= 0, op, ": clip must be >= 0 (0 = off), got ", s.clip);
  NewtonOptions o;
  o.method = parse_method(s.method);
  o.max_iter = s.max_iter;
  o.atol = s.atol;
  o.rtol = s.rtol;
  o.damping = s.damping;
  o.clip = s.clip;
  o.init = s.init;
  o.fixed_iterations = s.fixed_iterations;
  o.fallback = s.fallback;
  return o;
}

double default_tolerance(at::ScalarType dtype) { return dtype == at::kDouble ? 1e-10 : 1e-5; }

at::Tensor sequential_states(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0) {
  const int64_t T = gi.size(1);
  at::Tensor out = at::empty({gi.size(0), T, s0.size(1)}, s0.options());
  at::Tensor s = s0;
  for (int64_t t = 0; t < T; ++t) {
    s = cell.step(s, gi.select(1, t));
    out.select(1, t).copy_(s);
  }
  return out;
}

NewtonResult newton_solve(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const NewtonOptions& o) {
  const int64_t B = gi.size(0), T = gi.size(1), S = s0.size(1);
  const auto opts = s0.options();
  const double atol = o.atol < 0 ? default_tolerance(s0.scalar_type()) : o.atol;
  const double rtol = o.rtol < 0 ? default_tolerance(s0.scalar_type()) : o.rtol;
  const int64_t max_iter = o.max_iter < 0 ? std::min<int64_t>(T, 100) : o.max_iter;
  NewtonResult res;
  res.iterations = at::zeros({B}, opts.dtype(at::kLong));
  res.fell_back = at::zeros({B}, opts.dtype(at::kBool));
  if (T == 0 || o.method == Method::sequential) {
    res.states = sequential_states(cell, gi, s0);
    res.iterations.fill_(T);
    res.residual = at::zeros({B}, opts);
    res.converged = at::ones({B}, opts.dtype(at::kBool));
    return res;
  }
  const at::Tensor gi_flat = flat(gi);
  at::Tensor s;
  if (o.init == "zeros") {
    s = at::zeros({B, T, S}, opts);
  } else if (o.init == "one_step") {
    s = cell.step(s0.unsqueeze(1).expand({B, T, S}).reshape({B * T, S}), gi_flat).view({B, T, S});
  } else {
    TORCH_CHECK(o.init == "states", "pnewton.newton_rnn: init must be zeros, one_step or states, got '", o.init, "'");
    const std::vector<int64_t> shape{B, T, S};
    TORCH_CHECK(o.init_states.defined() && o.init_states.sizes() == at::IntArrayRef(shape),
                "pnewton.newton_rnn: init_states must be a [B, T, S] = [", B, ", ", T, ", ", S, "] tensor");
    s = o.init_states.to(opts).clone();
  }

  const JacobianPart part = method_part(cell, o.method);
  const bool newton_like = o.method != Method::jacobi && o.method != Method::picard;
  at::Tensor converged, residual;
  for (int64_t it = 0;; ++it) {
    const at::Tensor s_prev = flat(shifted(s0, s));
    // f and the Jacobian part from one evaluation of the gates (none after the last step).
    const CellFunction::Evaluation e =
        cell.evaluate(s_prev, gi_flat, newton_like && it < max_iter ? std::optional<JacobianPart>(part) : std::nullopt);
    const at::Tensor F = e.F.view({B, T, S});
    const at::Tensor r = s - F;
    residual = r.abs().amax({1, 2});
    const at::Tensor bound = atol + rtol * F.abs().amax({1, 2});
    converged = residual.isfinite() & (residual <= bound);
    if (it == max_iter) break;
    // Tolerance mode: one host synchronisation per iteration. Fixed mode: none.
    if (!o.fixed_iterations && converged.all().item<bool>()) break;

    at::Tensor next;
    if (o.method == Method::jacobi) {
      next = F;
    } else if (o.method == Method::picard) {
      next = s - r.cumsum(1);
    } else {
      const std::vector<int64_t> shape = part == JacobianPart::diagonal ? std::vector<int64_t>{B, T, S}
                                         : part == JacobianPart::block2 ? std::vector<int64_t>{B, T, S / 2, 2, 2}
                                                                        : std::vector<int64_t>{B, T, S, S};
      at::Tensor a = e.J.view(shape);
      if (o.damping > 0) a = a * (1.0 - o.damping);
      if (o.clip > 0) a = clip_jacobian(a, part, o.clip);
      next = s + newton_delta(a, r, part, S / 2);
    }
    // Non-finite values can only appear beyond the exact prefix (after iteration i the
    // first i states are exact), so resetting them keeps the ≤ T-iteration guarantee.
    next = at::where(next.isfinite(), next, at::zeros_like(next));
    // Converged sequences keep their states; only the others move.
    s = at::where(converged.view({B, 1, 1}), s, next);
    res.iterations += at::logical_not(converged).to(at::kLong);
  }
  res.states = s;
  res.residual = residual;
  res.converged = converged;
  if (o.fallback && !o.fixed_iterations && !converged.all().item<bool>()) {
    const at::Tensor redo = at::logical_not(converged).nonzero().squeeze(1);
    const at::Tensor exact = sequential_states(cell, gi.index_select(0, redo), s0.index_select(0, redo));
    res.states.index_copy_(0, redo, exact);
    res.iterations.index_fill_(0, redo, T);
    res.residual.index_fill_(0, redo, 0);
    // The loop's states are exact by definition, unless non-finite inputs made them NaN/Inf:
    // those sequences could not converge and say so.
    res.converged.index_copy_(0, redo, exact.isfinite().flatten(1).all(1));
    res.fell_back.index_fill_(0, redo, true);
  }
  return res;
}

namespace {

// λ by one transposed reverse scan over the true Jacobian A_{t+1} = A[:, 1:] (a view:
// no shifted copy), entering from λ_{T-1} = g_{T-1}.
at::Tensor adjoint_by_scan(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                           const at::Tensor& g, JacobianPart part) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2), D = S / 2;
  at::Tensor head;
  const at::Tensor J = cell.jacobian(s_prev, gi_flat, part);
  const at::Tensor g_head = g.narrow(1, 0, T - 1), g_last = g.select(1, T - 1);
  if (part == JacobianPart::diagonal) {
    head = scan_diag(J.view({B, T, S}).narrow(1, 1, T - 1), g_head, g_last, /*reverse=*/true);
  } else if (part == JacobianPart::block2) {
    head = scan_block(J.view({B, T, D, 2, 2}).narrow(1, 1, T - 1), g_head.reshape({B, T - 1, D, 2}),
                      g_last.reshape({B, D, 2}), true, /*transpose=*/true)
               .view({B, T - 1, S});
  } else {
    head = scan_block(J.view({B, T, 1, S, S}).narrow(1, 1, T - 1), g_head.unsqueeze(2), g_last.unsqueeze(1), true,
                      true)
               .squeeze(2);
  }
  return at::cat({head, g.narrow(1, T - 1, 1)}, 1);
}

// w_t = A_{t+1}ᵀ λ_{t+1} (zero at the last step), matrix-free through the cell's VJP.
at::Tensor next_step_transpose_product(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                                       const at::Tensor& lambda) {
  const int64_t B = lambda.size(0), T = lambda.size(1), S = lambda.size(2);
  const at::Tensor u = cell.transpose_product(s_prev, gi_flat, flat(lambda)).view({B, T, S});
  return at::cat({u.narrow(1, 1, T - 1), at::zeros_like(u.narrow(1, 0, 1))}, 1);
}

at::Tensor adjoint_sequential(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                              const at::Tensor& g) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2);
  const at::Tensor sp = s_prev.view({B, T, S}), gv = gi_flat.unflatten(0, {B, T});
  at::Tensor lambda = at::empty_like(g);
  at::Tensor l = g.select(1, T - 1);
  lambda.select(1, T - 1).copy_(l);
  for (int64_t t = T - 2; t >= 0; --t) {
    l = g.select(1, t) + cell.transpose_product(sp.select(1, t + 1), gv.select(1, t + 1), l);
    lambda.select(1, t).copy_(l);
  }
  return lambda;
}

// λ without forming A: a splitting iteration whose inner solve is the diagonal reverse
// scan. Like any undamped scheme it makes the last i adjoints exact after i sweeps.
at::Tensor adjoint_iterative(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& gi_flat,
                             const at::Tensor& g) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2);
  const double tol = default_tolerance(g.scalar_type());
  const at::Tensor diag = cell.jacobian(s_prev, gi_flat, JacobianPart::diagonal).view({B, T, S});
  auto diag_solve = [&](const at::Tensor& rhs) {
    const at::Tensor head = scan_diag(diag.narrow(1, 1, T - 1), rhs.narrow(1, 0, T - 1), rhs.select(1, T - 1), true);
    return at::cat({head, rhs.narrow(1, T - 1, 1)}, 1);
  };
  at::Tensor lambda = diag_solve(g);
  const int64_t budget = std::min<int64_t>(T, 100);
  for (int64_t it = 0; it < budget; ++it) {
    const at::Tensor w = next_step_transpose_product(cell, s_prev, gi_flat, lambda);
    const double err = (lambda - g - w).abs().max().item<double>();
    const double scale = lambda.abs().max().item<double>();
    if (std::isfinite(err) && err <= tol * (1 + scale)) return lambda;
    // The off-diagonal part of A_{t+1}ᵀ λ_{t+1} moves to the right-hand side.
    const at::Tensor dl = diag * lambda;
    const at::Tensor dl_next = at::cat({dl.narrow(1, 1, T - 1), at::zeros_like(dl.narrow(1, 0, 1))}, 1);
    lambda = diag_solve(g + w - dl_next);
  }
  return adjoint_sequential(cell, s_prev, gi_flat, g);
}

}  // namespace

at::Tensor solve_adjoint(const CellFunction& cell, const at::Tensor& s_prev, const at::Tensor& u_flat,
                         const at::Tensor& g, Adjoint adjoint) {
  const int64_t B = g.size(0), T = g.size(1), S = g.size(2);
  if (adjoint == Adjoint::automatic) {
    // The dense Jacobian costs B·T·S² numbers: form it only while that stays small.
    constexpr int64_t kDenseAdjointBudget = int64_t(1) << 24;
    adjoint = cell.structure() != JacobianPart::dense || B * T * S * S <= kDenseAdjointBudget ? Adjoint::scan
                                                                                             : Adjoint::iterative;
  }
  switch (adjoint) {
    case Adjoint::scan: return adjoint_by_scan(cell, s_prev, u_flat, g, cell.structure());
    case Adjoint::iterative: return adjoint_iterative(cell, s_prev, u_flat, g);
    default: return adjoint_sequential(cell, s_prev, u_flat, g);
  }
}

at::Tensor previous_states(const at::Tensor& s0, const at::Tensor& states) { return flat(shifted(s0, states)); }

NewtonGrads newton_backward(const Cell& cell, const at::Tensor& grad_states, const at::Tensor& gi,
                            const at::Tensor& s0, const at::Tensor& states, Adjoint adjoint) {
  const int64_t B = gi.size(0), T = gi.size(1), S = s0.size(1);
  NewtonGrads grads;
  if (T == 0) {
    grads.gi = at::zeros_like(gi);
    grads.W_hh = at::zeros_like(cell.weight());
    grads.b_hh = at::zeros({cell.gate_size()}, gi.options());
    grads.s0 = at::zeros_like(s0);
    return grads;
  }
  const at::Tensor s_prev = previous_states(s0, states);
  const at::Tensor gi_flat = flat(gi);
  const at::Tensor lambda = solve_adjoint(cell, s_prev, gi_flat, grad_states.contiguous(), adjoint);
  // Everything else is parallel over t: one VJP of the cell at the solution.
  const Cell::Vjp v = cell.vjp(s_prev, gi_flat, flat(lambda));
  grads.gi = v.gi.view({B, T, -1});
  grads.W_hh = cell.weight_grad(v.gh, cell.hidden_of(s_prev));
  grads.b_hh = v.gh.sum(0);
  grads.s0 = v.s.view({B, T, S}).select(1, 0);
  return grads;
}

}  // namespace pnewton
