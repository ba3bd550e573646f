// One stage of the solver (DESIGN §1): each iteration evaluates the cell at every step at
// once (F, the method's Jacobian part, the residual r = s − F and its per-step maxima),
// takes the method's step (a scan of δ_t = Ã_t δ_{t−1} − r_t, the ELK step, Picard's sum
// or Jacobi's F), and tests convergence on the step. A Stage holds what the iterations
// share; each job is one method.
#include "csrc/solver/stage.h"

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "csrc/solver/elk.h"
#include "csrc/solver/segments.h"
#include "csrc/solver/sequence.h"
#include "csrc/solver/update.h"

namespace pnewton {
namespace {

// Adaptive λ: a trust region on the merit ½ Σ_t w_t ‖r_t‖² (expansion_weights gives the
// w_t). λ shrinks by kShrink when the step's actual decrease is over 3/4 of the predicted
// one ρ, grows by kGrow below 1/4. A step is accepted when ρ > kAccept or its merit stays
// within kNonmonotone times the largest of the last kStallWindow accepted merits (a
// nonmonotone test: an approximate Jacobian's step need not descend). When the merit has
// not halved in kStallWindow iterations while λ > kLambdaStart, λ restarts at
// kLambdaRestart: that stall is the damping's (a large λ shrinks the step to nothing where
// the approximation's step does not descend), not the problem's.
constexpr double kLambdaStart = 1.0, kLambdaMin = 1e-12, kLambdaRestart = 1e-6;
constexpr double kShrink = 0.1, kGrow = 4.0, kAccept = 1e-4, kNonmonotone = 4.0;
// The step's λ is at least μ · max_t ‖r_t‖∞ / max(1, max_t ‖s_t‖∞): the
// residual-proportional Levenberg–Marquardt parameter (Yamashita & Fukushima 2001, Fan &
// Yuan 2005), relative to the states' scale so that it has no units. The trust region above
// cannot raise λ where the linearisation expands beyond the exact prefix (chaotic systems):
// its weighted merit falls on every step, λ sits at kLambdaMin and the undamped tail
// explodes (Lorenz: states of 10¹⁶, residuals of 10²⁷). A residual that large damps the
// next step by itself, and near the solution the floor vanishes with the residual, so the
// last iterations are Newton's. μ = kResidualDamping, but kResidualDampingQuasiFilter for
// the quasi-ELK filter on a cell whose Jacobian is not diagonal: its linear model misses the
// coupling as well, and its tail beyond the prefix gets no smoother's correction. Both
// values are empirical (benchmarks/bench_damping.py, table in benchmarks/RESULTS.md): with
// them every method converges within 1.5× of the best fixed λ on every problem of the table
// where some fixed λ converges; the quasi filter on chaotic Lorenz only for μ in 0.7..2, the
// smoother loses up to 1.7× with μ = 1.
constexpr double kResidualDamping = 1e-2, kResidualDampingQuasiFilter = 1.0;

// Clip a Jacobian approximation: entries (diagonal) or blocks by their Frobenius norm,
// which bounds the spectral norm, so every clipped step is a contraction when clip < 1.
at::Tensor clip_jacobian(const at::Tensor& a, JacobianPart part, double clip) {
  if (part == JacobianPart::diagonal) return a.clamp(-clip, clip);
  const at::Tensor norm = at::linalg_matrix_norm(a, "fro").unsqueeze(-1).unsqueeze(-1);
  return a * at::clamp_max(clip / norm.clamp_min(1e-30), 1.0);
}

// Σ_s x² per step of x [B, T, S]: [B, T], or the fused pass's sums where it gave them.
at::Tensor squares_per_step(const at::Tensor& x, const at::Tensor& given = {}) {
  return given.defined() ? given : x.square().sum(2);
}

// max_s |x_{t,s}| per step of x [B, T, S], NaN propagating: [B, T].
at::Tensor max_abs_per_step(const at::Tensor& x) {
  return x.is_cuda() ? at::linalg_vector_norm(x, INFINITY, at::IntArrayRef{2}) : x.abs().amax(2);
}

// −δ for δ solving δ_t = Ã_t δ_{t-1} − r_t, δ_0 = 0, for Ã in a part of block width k: the
// scan of r itself (the recurrence is linear), which saves negating r.
at::Tensor negated_newton_delta(const at::Tensor& a, const at::Tensor& r, int64_t k, TimeShards* shards) {
  return part_scan(shards, a, r, k);
}

// [B, T, 1, ...]: a per-step mask broadcast over a Jacobian part of `shape` [B, T, ...].
std::vector<int64_t> jacobian_mask_shape(const std::vector<int64_t>& shape) {
  std::vector<int64_t> mask(shape.size(), 1);
  mask[0] = shape[0], mask[1] = shape[1];
  return mask;
}

JacobianPart method_part(const CellFunction& cell, Method method) {
  switch (method) {
    case Method::deer:
    case Method::elk:
    case Method::elk_filter: return cell.structure();
    case Method::block_deer:
      TORCH_CHECK(cell.has_blocks(), "pnewton: method 'block_deer' needs an lstm, diag_lstm or other cell with 2x2 "
                  "blocks of state pairs");
      return JacobianPart::block2;
    default: return JacobianPart::diagonal;
  }
}

// The cell at states s: F (where a step reads it: Jacobi's; the fused pass writes it only
// then), J in the method's part, the residual r = s − F, and per step [B, T]: max_s |r|,
// the scale max_s |s| (0 on padding) and, where the fused pass gives it, Σ_s r² (the
// merit's part).
struct Evaluation {
  at::Tensor F, J, r, r_per_step, scale_per_step, r_square;
};

// The step just taken: the next states, max_t |δ_t| per sequence, and the ELK step's
// predicted decrease of the merit.
struct Step {
  at::Tensor next, size, predicted;
};

class Stage {
 public:
  Stage(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, const StagePlan& plan,
        const NewtonOptions& o, const at::Tensor& padding, Progress& p);
  void run();

 private:
  Evaluation evaluate(const at::Tensor& s, bool with_jacobian) const;
  at::Tensor merit(const at::Tensor& square_per_step, const at::Tensor& weights = {}) const;
  at::Tensor expansion_weights(const at::Tensor& a) const;
  at::Tensor residual_damping() const;
  void check(at::Tensor step, const at::Tensor& phi);
  bool should_stop(int64_t it, const std::vector<at::Tensor>& history) const;
  Step take(const at::Tensor& moving);
  void accept(Evaluation e, Step step, const at::Tensor& moving, bool more, const std::vector<at::Tensor>& history);
  // Padding is no part of the system: its residual is zero, it takes no step (a step
  // decaying through it would leave subnormal states, which slow the GEMMs tenfold), and it
  // adds nothing to the scale. Masked, not multiplied: NaN · 0 is NaN.
  at::Tensor without_padding(at::Tensor x) const { return padding_.defined() ? x.masked_fill_(padding_, 0) : x; }

  const CellFunction& cell_;
  const Cell* builtin_;  // a built-in cell evaluates in one fused pass
  const at::Tensor &gi_flat_, &s0_, &padding_;
  const StagePlan& plan_;
  const NewtonOptions& o_;
  Progress& p_;
  TimeShards* shards_;
  int64_t B_, T_, S_, steps_all_, offset_;
  JacobianPart part_;
  int64_t k_;  // the part's block width (block_width)
  bool newton_like_, elk_, smooth_, exact_prefix_, adaptive_, track_merit_, reads_F_;
  int64_t budget_;
  std::vector<int64_t> shape_;  // the Jacobian part's
  at::Tensor carried_;          // 0 at reset steps (their Jacobian is zero), or undefined
  at::Tensor steps_, iterations_before_, nonfinite_merit_, lambda_;
  // The current iterate's evaluation (its residual lives in p.r; F where read) and merit
  // ½‖r‖² (where read).
  at::Tensor F_, J_, r_per_step_, scale_per_step_, square_per_step_, phi_;
  at::Tensor weights_;  // the adaptive trust region's w_t [B, T] at the iterate stepped from
  at::Tensor scale_;    // max_t ‖s_t‖∞ per sequence at the current iterate (check)
};

Stage::Stage(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, const StagePlan& plan,
             const NewtonOptions& o, const at::Tensor& padding, Progress& p)
    : cell_(cell), builtin_(dynamic_cast<const Cell*>(&cell)), gi_flat_(gi_flat), s0_(s0), padding_(padding),
      plan_(plan), o_(o), p_(p), shards_(o.shards.get()) {
  B_ = s0.size(0), S_ = s0.size(1), T_ = gi_flat.size(0) / std::max<int64_t>(B_, 1);
  // The whole sequence's length, and where this shard starts in it.
  steps_all_ = shards_ ? shards_->total() : T_, offset_ = shards_ ? shards_->offset() : 0;
  part_ = method_part(cell, plan.method);
  newton_like_ = plan.method != Method::jacobi && plan.method != Method::picard;
  elk_ = is_elk(plan.method), smooth_ = plan.method == Method::elk || plan.method == Method::quasi_elk;
  // Every method but ELK makes one more state exact per iteration (δ_t = Ã_t δ_{t−1} − r_t
  // is causal: once δ_{t−1} = 0, δ_t = −r_t makes s_t = f(s_{t−1}, u_t)), whatever Ã is:
  // after T iterations it has the solution, so no budget beyond T can help.
  exact_prefix_ = !elk_;
  budget_ = exact_prefix_ ? std::min(plan.budget, steps_all_) : plan.budget;
  adaptive_ = elk_ && plan.damping == 0;
  // ½‖r‖² per sequence, where something reads it (the stall test, the ELK step).
  track_merit_ = plan.stop_on_stall || elk_;
  reads_F_ = plan.method == Method::jacobi;
  lambda_ = at::full({B_}, adaptive_ ? kLambdaStart : plan.damping, s0.options());
  k_ = block_width(part_, cell);
  shape_ = k_ == 1 ? std::vector<int64_t>{B_, T_, S_} : std::vector<int64_t>{B_, T_, S_ / k_, k_, k_};
  if (o.resets.defined()) carried_ = carried_steps(o.resets, s0.scalar_type());
  steps_ = o.lengths.defined() ? o.lengths : at::full({B_}, steps_all_, p.iterations.options());
  iterations_before_ = p.iterations.clone();
  nonfinite_merit_ = at::zeros({B_}, p.iterations.options());
}

Evaluation Stage::evaluate(const at::Tensor& s, bool with_jacobian) const {
  const at::Tensor entering = entering_state(shards_, s0_, s);
  const std::optional<JacobianPart> want = newton_like_ && with_jacobian ? std::optional<JacobianPart>(part_)
                                                                         : std::nullopt;
  if (builtin_ != nullptr) {
    const at::Tensor rows_padding = padding_.defined() ? padding_.view({B_ * T_}) : at::Tensor();
    const at::Tensor rows_reset = o_.resets.defined() ? o_.resets.reshape({B_ * T_}) : at::Tensor();
    if (auto it = builtin_->iterate(s, s0_, entering, gi_flat_, want, rows_padding, rows_reset, reads_F_,
                                    p_.workspace.get())) {
      return Evaluation{it->F.defined() ? it->F.view({B_, T_, S_}) : it->F,
                        it->J.defined() ? it->J.view(shape_) : it->J,
                        it->R.view({B_, T_, S_}), it->row_residual.view({B_, T_}), it->row_scale.view({B_, T_}),
                        it->row_square.view({B_, T_})};
    }
  }
  const at::Tensor prev = previous_steps(s0_, s, o_.resets, entering);
  CellFunction::Evaluation e = cell_.evaluate(flat(prev), gi_flat_, want);
  at::Tensor jacobian = e.J.defined() ? e.J.view(shape_) : e.J;
  if (carried_.defined() && jacobian.defined()) jacobian = jacobian * carried_.view(jacobian_mask_shape(shape_));
  const at::Tensor F = e.F.view({B_, T_, S_});
  const at::Tensor r = without_padding(s - F);
  return Evaluation{reads_F_ ? F : at::Tensor(), jacobian, r, max_abs_per_step(r),
                    max_abs_per_step(padding_.defined() ? s.masked_fill(padding_, 0) : s)};
}

// ½ Σ_t w_t ‖x_t‖² per sequence from the squares per step [B, T] (w = 1 when undefined).
// A non-finite x_t makes it infinite whatever its weight (∞ · 0 is NaN).
at::Tensor Stage::merit(const at::Tensor& square_per_step, const at::Tensor& weights) const {
  const at::Tensor terms = weights.defined() ? square_per_step * weights : square_per_step;
  at::Tensor m = 0.5 * (T_ > 0 ? terms.sum(1) : at::zeros({B_}, square_per_step.options()));
  if (shards_) m = shards_->sum(m);
  return at::where(m.isfinite(), m, at::full_like(m, INFINITY));
}

// The weights of the adaptive trust region's merit, w_t = exp(−2 E_t) for a [B, T, ...] in
// the stage's part, where E_t = max_{τ ≤ t} Σ_{τ < u ≤ t} log ‖Ã_u‖ (∞-norms: an upper bound
// of log ‖Ã_t ⋯ Ã_{τ+1}‖) is how far the linearisation expands into step t from any earlier
// step. A residual at step τ moves the states after it by that product, so where the
// linearisation expands the plain ½‖r‖² is exponentially ill-conditioned: a step that makes
// the prefix right moves the rest of the sequence to a new, still wrong state and raises
// ½‖r‖² before it falls (the filter's step is then not even a descent direction of it),
// and a trust region on it rejects every step until λ is so large the step vanishes. The
// weights undo that growth: w = 1 wherever the linearisation contracts (then the merit is
// ½‖r‖²), and an expanding stretch counts with the inverse square of its growth, so the
// test judges the prefix the step can fix. A non-finite Ã counts as infinite growth. The
// per-step norm overstates the growth of non-normal Jacobians (Lorenz's Euler step:
// ‖Ã‖∞ ≈ 1.3 per step against a true e^0.012), which makes the merit short-sighted there.
at::Tensor Stage::expansion_weights(const at::Tensor& a) const {
  const at::Tensor norm = k_ == 1 ? a.abs().amax(2) : a.abs().sum(-1).amax({-1, -2});  // [B, T]
  const double big = a.scalar_type() == at::kDouble ? 1e300 : 1e30;
  at::Tensor L = at::nan_to_num(norm, big, big).clamp_min(std::numeric_limits<float>::min()).log().cumsum(1);
  at::Tensor low = T_ > 0 ? std::get<0>(L.cummin(1)) : L;
  if (shards_) {
    // The earlier shards' total growth and lowest running sum: one gather.
    const at::Tensor none = at::zeros({B_}, L.options());
    const at::Tensor rows =
        shards_->gather(at::stack({T_ > 0 ? L.select(1, T_ - 1) : none, T_ > 0 ? low.select(1, T_ - 1) : none}));
    at::Tensor before = none, low_before = none;
    for (int64_t q = 0; q < shards_->position(); ++q) {
      low_before = at::minimum(low_before, before + rows[q][1]);
      before = before + rows[q][0];
    }
    L = L + before.unsqueeze(1);
    low = at::minimum(low + before.unsqueeze(1), low_before.unsqueeze(1));
  }
  return at::exp(-2 * (L - at::clamp_max(low, 0)));
}

// The adaptive step's least λ per sequence, μ · max_t ‖r_t‖∞ / max(1, max_t ‖s_t‖∞) (above);
// a non-finite residual (never accepted, but the first iterate's may be) gives kLambdaMax.
at::Tensor Stage::residual_damping() const {
  const double mu = part_ != cell_.structure() && !smooth_ ? kResidualDampingQuasiFilter : kResidualDamping;
  const at::Tensor floor = mu * p_.residual / scale_.clamp_min(1.0);
  return at::nan_to_num(floor, kLambdaMax, kLambdaMax).clamp(kLambdaMin, kLambdaMax);
}

// Converged: every state finite, and within tolerance of the solution, judged by the
// error estimate max_t |δ_t| of the step just taken (the residual alone understates the
// error by the recurrence's memory, 1/(1 − contraction)), relative to the states' own
// scale max_t |s_t| (f's can be far larger at a diverged iterate); or, for the methods
// that make one more state exact per iteration, as many iterations in this stage as the
// sequence has steps; or an exact residual. Once converged, a sequence stays so (its
// states no longer move). A finite residual s − F means finite states.
void Stage::check(at::Tensor step, const at::Tensor& phi) {
  p_.residual = max_over_time(r_per_step_);
  at::Tensor scale = max_over_time(scale_per_step_);
  // The first step (of the whole sequence) whose residual is not finite; steps_all if none.
  at::Tensor first_bad;
  if (exact_prefix_) {
    first_bad = first_step(r_per_step_.isfinite().logical_not());
    first_bad = at::where(first_bad == T_, steps_all_, first_bad + offset_);
  }
  if (shards_) {
    // The iteration's one reduction over the ranks: every per-sequence number at once.
    std::vector<at::Tensor> parts{p_.residual, scale};
    const at::ScalarType dtype = p_.r.scalar_type();
    if (step.defined()) parts.push_back(step.to(dtype));
    if (exact_prefix_) parts.push_back(-first_bad.to(at::kDouble).to(dtype));
    const at::Tensor all = shards_->max(at::stack(parts).to(at::kDouble));
    p_.residual = all[0].to(dtype), scale = all[1].to(dtype);
    if (step.defined()) step = all[2].to(dtype);
    if (exact_prefix_) first_bad = (-all[parts.size() - 1]).to(at::kLong);
  }
  scale_ = scale;
  const at::Tensor finite = p_.residual.isfinite();
  at::Tensor done = p_.residual == 0;
  if (step.defined()) {
    const at::Tensor tolerance = plan_.atol + plan_.rtol * scale;
    at::Tensor small = step.isfinite() & (step <= tolerance);
    // A damped (ELK) step is small where λ is large, converged or not: the residual too.
    if (elk_) small = small & (p_.residual <= tolerance);
    done = done | small;
  }
  const at::Tensor iterated = p_.iterations - iterations_before_;
  if (exact_prefix_) {
    done = done | (iterated >= steps_);
    // A non-finite residual inside the exact prefix is the solution's own: it cannot converge.
    p_.stuck = p_.stuck | (finite.logical_not() & (first_bad < iterated));
  } else if (phi.defined()) {
    // ELK accepts finite steps only: a merit non-finite for kStallWindow iterations stays so.
    nonfinite_merit_ = at::where(phi.isfinite(), 0, nonfinite_merit_ + 1);
    p_.stuck = p_.stuck | (nonfinite_merit_ >= kStallWindow);
  }
  if (p_.converged.defined()) done = done | p_.converged;
  p_.converged = finite & done;
}

// Tolerance mode: one host synchronisation per iteration (fixed mode: none). A stage ends
// when every sequence has settled or, with the stall test, none halved ½‖r‖² in the last
// kStallWindow iterations.
bool Stage::should_stop(int64_t it, const std::vector<at::Tensor>& history) const {
  if (o_.fixed_iterations) return false;
  const at::Tensor settled = p_.converged | p_.stuck;
  at::Tensor stop = settled.all();
  // The adaptive trust region restarts λ after a stall (accept): it gets a second window.
  const int64_t window = adaptive_ ? 2 * kStallWindow : kStallWindow;
  if (plan_.stop_on_stall && it >= window) {
    const at::Tensor halved = phi_ <= 0.5 * history[history.size() - 1 - window];
    stop = stop | (settled | halved.logical_not()).all();
  }
  return stop.item<bool>();
}

// The method's step from p.s. Non-finite values beyond the exact prefix are no part of the
// solution (after iteration i the first i states of a causal method are exact): resetting
// them (take_step) keeps the ≤ T-iteration guarantee. Non-finite values of the solution
// itself make the sequence stuck (check), and the states returned for it carry them
// (nonfinite_pattern).
Step Stage::take(const at::Tensor& moving) {
  Step out;
  Workspace* workspace = p_.workspace.get();
  if (plan_.method == Method::jacobi) {
    out.next = at::where(moving.view({B_, 1, 1}), at::nan_to_num(F_, 0.0, 0.0, 0.0), p_.s);
    out.size = p_.residual;
    return out;
  }
  if (plan_.method == Method::picard) {
    const at::Tensor sum = shards_ ? diag_scan(shards_, at::ones_like(p_.r), p_.r) : p_.r.cumsum(1);
    std::tie(out.next, out.size) = take_step(p_.s, sum, -1, moving, padding_, workspace);
    return out;
  }
  at::Tensor a = J_;
  if (plan_.damping > 0 && !elk_) a = a * (1.0 - plan_.damping);
  if (o_.clip > 0) a = clip_jacobian(a, part_, o_.clip);
  if (elk_) {
    const at::Tensor lambda = adaptive_ ? at::maximum(lambda_, residual_damping()) : lambda_;
    const at::Tensor delta = without_padding(elk_delta(a, p_.r, lambda, k_, smooth_, shards_));
    if (adaptive_) {
      // The merit's weights at this iterate (and the iterate's merit under them).
      weights_ = expansion_weights(a);
      phi_ = merit(square_per_step_, weights_);
    }
    out.predicted =
        phi_ - merit(squares_per_step(p_.r + delta - apply_approximation(a, delta, k_, shards_)), weights_);
    std::tie(out.next, out.size) = take_step(p_.s, delta, 1, moving, padding_, workspace);
  } else {
    std::tie(out.next, out.size) =
        take_step(p_.s, negated_newton_delta(a, p_.r, k_, shards_), -1, moving, padding_, workspace);
  }
  return out;
}

// Moves to the evaluated step: always, or as the adaptive trust region decides (above;
// history: the accepted merits so far, the latest last).
void Stage::accept(Evaluation e, Step step, const at::Tensor& moving, bool more, const std::vector<at::Tensor>& history) {
  if (!adaptive_) {
    p_.s = step.next, F_ = e.F, J_ = e.J, p_.r = e.r, r_per_step_ = e.r_per_step, scale_per_step_ = e.scale_per_step;
    if (track_merit_) square_per_step_ = squares_per_step(p_.r, e.r_square), phi_ = merit(square_per_step_);
    check(step.size, phi_);
    return;
  }
  const at::Tensor square_new = squares_per_step(e.r, e.r_square);
  const at::Tensor phi_new = merit(square_new, weights_);
  const at::Tensor rho = (phi_ - phi_new) / step.predicted.clamp_min(std::numeric_limits<float>::min());
  const int64_t n = static_cast<int64_t>(history.size());
  const at::Tensor reference = at::stack(at::TensorList(history).slice(n - std::min(n, kStallWindow))).amax(0);
  const at::Tensor accepted =
      moving & phi_new.isfinite() & ((rho > kAccept) | (phi_new <= kNonmonotone * reference));
  const at::Tensor poor = moving & ((rho < 0.25) | rho.isfinite().logical_not());
  lambda_ = at::where(moving & (rho > 0.75), lambda_ * kShrink, at::where(poor, lambda_ * kGrow, lambda_))
                .clamp(kLambdaMin, kLambdaMax);
  const at::Tensor keep = accepted.view({B_, 1, 1}), keep_rows = accepted.view({B_, 1});
  p_.s = at::where(keep, step.next, p_.s);
  p_.r = at::where(keep, e.r, p_.r);
  r_per_step_ = at::where(keep_rows, e.r_per_step, r_per_step_);
  scale_per_step_ = at::where(keep_rows, e.scale_per_step, scale_per_step_);
  square_per_step_ = at::where(keep_rows, square_new, square_per_step_);
  if (more) J_ = at::where(keep_rows, e.J.reshape({B_, -1}), J_.reshape({B_, -1})).view(shape_);
  phi_ = at::where(accepted, phi_new, phi_);
  if (n >= kStallWindow) {
    const at::Tensor stalled = moving & (phi_ > 0.5 * history[n - kStallWindow]) & (lambda_ > kLambdaStart);
    lambda_ = at::where(stalled, kLambdaRestart, lambda_);
  }
  check(at::where(accepted, step.size, INFINITY), phi_);  // a rejected step moved nothing
}

void Stage::run() {
  {
    const Evaluation e = evaluate(p_.s, budget_ > 0);
    F_ = e.F, J_ = e.J, p_.r = e.r, r_per_step_ = e.r_per_step, scale_per_step_ = e.scale_per_step;
    if (track_merit_) square_per_step_ = squares_per_step(p_.r, e.r_square), phi_ = merit(square_per_step_);
  }
  check(at::Tensor(), at::Tensor());
  // Where the stage starts, for method="auto"'s choice between its end and its start.
  p_.entry = Progress::Entry{p_.s, p_.r, p_.residual};
  std::vector<at::Tensor> history{phi_};
  for (int64_t it = 0; it < budget_; ++it) {
    // Not tested before the first step (one host read less per stage): a stage starts with
    // a sequence unsettled (auto read so), or rarely with every one settled (exact states),
    // where that step moves nothing and the next test stops.
    if (it > 0 && should_stop(it, history)) break;
    const at::Tensor moving = at::logical_not(p_.converged | p_.stuck);
    p_.path = p_.path | at::where(moving, method_bit(plan_.method), 0);
    Step step = take(moving);
    const bool more = it + 1 < budget_;
    Evaluation e = evaluate(step.next, more);
    p_.iterations += moving.to(at::kLong);
    accept(std::move(e), std::move(step), moving, more, history);
    history.push_back(phi_);
  }
}

}  // namespace

void run_stage(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, const StagePlan& plan,
               const NewtonOptions& o, const at::Tensor& padding, Progress& p) {
  Stage(cell, gi_flat, s0, plan, o, padding, p).run();
}

}  // namespace pnewton
