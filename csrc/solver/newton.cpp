// The solver's driver (DESIGN §1): the start (init), one stage or auto's stages with the
// choice between a stage's end and its start, then the fallback to the loop or the NaN
// pattern of a stuck sequence. A stage is csrc/solver/stage.cpp, the sequence layout
// csrc/solver/sequence.cpp, the options csrc/solver/options.cpp, the adjoints
// csrc/solver/adjoint.cpp.
#include "csrc/solver/newton.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "csrc/solver/segments.h"
#include "csrc/solver/sequence.h"
#include "csrc/solver/stage.h"

namespace pnewton {
namespace {

// The auto method's per-stage budget, c·log₂T iterations (and its stall test: StagePlan's
// stop_on_stall, csrc/solver/stage.cpp).
int64_t auto_budget(int64_t T) { return std::max<int64_t>(8, 4 * static_cast<int64_t>(std::ceil(std::log2(T + 1.0)))); }

// The stages of method="auto": the cheapest method expected to converge, then exact
// Newton where the Jacobian's blocks are affordable, then the ELK filter step under the
// adaptive trust region (csrc/solver/stage.cpp), which bounds the step where the
// linearisation expands and needs no λ (see README "Choosing a method"). Where the diagonal
// costs the whole Jacobian (CellFunction::cheap_diagonal: pnewton.solve's torch.func),
// exact Newton comes first while affordable. rows: B·T.
std::vector<Method> auto_stages(const CellFunction& cell, int64_t rows, bool sharded) {
  const JacobianPart structure = cell.structure();
  const int64_t S = cell.state_size(), k = block_width(structure, cell);
  std::vector<Method> stages;
  if (structure == JacobianPart::diagonal || structure == JacobianPart::block2 ||
      (structure == JacobianPart::blocks && k <= kBlockNewtonStates)) {
    stages = {Method::deer, Method::elk_filter};
  } else if (!cell.cheap_diagonal() && rows * S * k <= kDenseBudget) {
    stages = {Method::deer, Method::quasi_elk_filter};
  } else {
    stages = {cell.has_blocks() ? Method::block_deer : Method::quasi_deer};
    if (rows * S * k <= kDenseBudget) stages.push_back(Method::deer);
    stages.push_back(Method::quasi_elk_filter);
  }
  // Time shards: the ELK stage of the diagonal part only (its step composes across shards).
  if (sharded && stages.back() == Method::elk_filter && structure != JacobianPart::diagonal) stages.pop_back();
  return stages;
}

// Where the solution of a sequence is not finite, from the residual r = s − F [B, T, S] at
// the returned states s, exact up to the first non-finite step t0 of a stuck sequence (s is
// finite wherever a step moved it, take_step, so r is not finite exactly where the cell's
// F is; an initial state not finite and never moved counts as well): the
// entries that are non-finite there, and everything the recurrence carries them to after
// t0 — the same state entry (diagonal cells), its block of k (the (h, c) pair, a head) or
// every entry (dense) — up to the next reset. This is the NaN pattern of the loop (torch.nn's) for NaN
// inputs, without running the loop.
at::Tensor nonfinite_pattern(const at::Tensor& r, int64_t k, const at::Tensor& resets,
                             const at::Tensor& padding, TimeShards* shards) {
  const int64_t B = r.size(0), T = r.size(1), S = r.size(2);
  at::Tensor bad = r.isfinite().logical_not();
  if (padding.defined()) bad.masked_fill_(padding, false);
  at::Tensor spread = bad;
  if (k == S) spread = bad.any(-1, true);
  else if (k > 1) spread = bad.view({B, T, S / k, k}).any(-1, true).expand({B, T, S / k, k});
  spread = spread.reshape({B, T, k == S ? 1 : S});
  // Global step indices (time shards: this shard's offset added); -1: none.
  const int64_t offset = shards ? shards->offset() : 0;
  const at::Tensor t = at::arange(offset, offset + T, r.options().dtype(at::kLong)).view({1, T, 1});
  // The last bad step up to t, and the start of t's segment (the latest reset; 0 before any).
  at::Tensor last = std::get<0>(at::where(spread, t, -1).cummax(1));
  at::Tensor start = resets.defined() ? std::get<0>(at::where(resets, t.squeeze(-1), -1).cummax(1)).unsqueeze(-1)
                                      : at::full({B, T, 1}, -1, t.options());
  // Time shards: what the earlier shards carry in (their last bad step, their latest reset:
  // one gather, the rare stuck case only).
  at::Tensor last_in = at::full({B, last.size(2)}, -1, t.options()), start_in = at::full({B, 1}, -1, t.options());
  if (shards) {
    const at::Tensor ends = at::cat({T > 0 ? last.select(1, T - 1) : last_in, T > 0 ? start.select(1, T - 1) : start_in}, 1);
    const at::Tensor rows = shards->gather(ends);
    for (int64_t q = 0; q < shards->position(); ++q) {
      last_in = at::maximum(last_in, rows[q].narrow(1, 0, last_in.size(1)));
      start_in = at::maximum(start_in, rows[q].narrow(1, last_in.size(1), 1));
    }
  }
  last = at::maximum(last, last_in.unsqueeze(1));
  start = at::maximum(at::maximum(start, start_in.unsqueeze(1)), at::zeros({1}, t.options()));
  const at::Tensor last_before =
      T > 0 ? at::cat({last_in.unsqueeze(1), last.narrow(1, 0, T - 1)}, 1) : last;
  return bad | (last_before >= start);
}

// What a solve returns where the loop made the states: the solution by definition, unless
// not finite (then not converged, and a NaN residual, as the residual of NaN states is).
void set_exact(const at::Tensor& states, TimeShards* shards, at::Tensor& converged, at::Tensor& residual) {
  // One reduction (max |x|, NaN propagating), not isfinite's four passes over the states.
  converged = states.numel() == 0 ? at::ones({states.size(0)}, states.options().dtype(at::kBool))
                                  : at::linalg_vector_norm(states.flatten(1), INFINITY, at::IntArrayRef{1}).isfinite();
  if (shards) converged = shards->max(converged.logical_not().to(at::kFloat)) == 0;
  residual = at::where(converged, 0.0, NAN).to(states.scalar_type());
}

// The loop's solve: every step exact (an empty sequence, method "sequential").
NewtonResult loop_result(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const NewtonOptions& o,
                         int64_t steps_all, NewtonResult res) {
  TimeShards* shards = o.shards.get();
  res.states = loop_states(cell, gi, s0, o.resets, shards);
  if (o.lengths.defined()) res.states = held_states(res.states, s0, o.lengths, shards);
  if (o.lengths.defined()) res.iterations.copy_(o.lengths); else res.iterations.fill_(steps_all);
  set_exact(res.states, shards, res.converged, res.residual);
  if (steps_all > 0) res.path.fill_(method_bit(Method::sequential));
  return res;
}

// The first iterate: zeros, every step from s0 (one_step), or the caller's warm start.
at::Tensor initial_states(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, int64_t T,
                          const NewtonOptions& o) {
  const int64_t B = s0.size(0), S = s0.size(1);
  if (o.init == "zeros") return at::zeros({B, T, S}, s0.options());
  if (o.init == "one_step") {
    return cell.step(s0.unsqueeze(1).expand({B, T, S}).reshape({B * T, S}), gi_flat).view({B, T, S});
  }
  // "states" (newton_options checked init; the op checked init_states)
  TORCH_CHECK(o.init_states.defined(), "pnewton: init='states' needs init_states");
  return o.init_states.to(s0.options()).clone();
}

// method="auto": its stages in turn, within max_iter in all. A stage that left an
// unconverged sequence worse than it found it hands the next stage its start (the states
// are moved only when one did). A converged one stays: its step passed the stop test, and
// at the rounding floor a confirming step may move the residual up by an ulp. One host read
// per stage: whether one got worse, the iterations it took, whether every sequence settled.
void run_auto(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, const NewtonOptions& o,
              StagePlan plan, int64_t steps_all, const at::Tensor& padding, Progress& p) {
  const int64_t B = s0.size(0);
  int64_t left = o.max_iter < 0 ? std::numeric_limits<int64_t>::max() : o.max_iter;
  for (const Method m : auto_stages(cell, B * steps_all, o.shards != nullptr)) {
    plan.method = m, plan.budget = std::min(auto_budget(steps_all), left), plan.stop_on_stall = true;
    plan.damping = is_elk(m) ? 0.0 : o.damping;
    const at::Tensor before = p.iterations.max();
    run_stage(cell, gi_flat, s0, plan, o, padding, p);
    const Progress::Entry& start = p.entry;
    const at::Tensor worse = p.stuck.logical_not() & p.converged.logical_not() &
                             ((p.residual > start.residual) | p.residual.isfinite().logical_not());
    // (A worse sequence is unconverged, and was at the stage's start: converged stays so.)
    const at::Tensor read = at::stack({worse.any().to(at::kLong), p.iterations.max() - before,
                                       (p.converged | p.stuck).all().to(at::kLong)}).cpu();
    const int64_t* flags = read.const_data_ptr<int64_t>();
    if (flags[0] != 0) {
      p.s = at::where(worse.view({B, 1, 1}), start.s, p.s);
      p.r = at::where(worse.view({B, 1, 1}), start.r, p.r);
      p.residual = at::where(worse, start.residual, p.residual);
    }
    left -= flags[1];
    if (left <= 0 || flags[2] != 0) break;
  }
}

// The sequences that did not converge, rerun by the loop.
NewtonResult fall_back(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const NewtonOptions& o,
                       const Progress& p, int64_t steps_all, NewtonResult res) {
  TimeShards* shards = o.shards.get();
  const at::Tensor& lengths = o.lengths;
  res.states = lengths.defined() ? held_states(p.s, s0, lengths, shards) : p.s;
  const at::Tensor redo = at::logical_not(res.converged).nonzero().squeeze(1);
  const at::Tensor s0_redo = s0.index_select(0, redo);
  at::Tensor states = loop_states(cell, gi.index_select(0, redo), s0_redo,
                                  o.resets.defined() ? o.resets.index_select(0, redo) : at::Tensor(), shards);
  if (lengths.defined()) states = held_states(states, s0_redo, lengths.index_select(0, redo), shards);
  res.states.index_copy_(0, redo, states);
  if (lengths.defined()) res.iterations.index_copy_(0, redo, lengths.index_select(0, redo));
  else res.iterations.index_fill_(0, redo, steps_all);
  at::Tensor converged, residual;
  set_exact(states, shards, converged, residual);
  res.converged.index_copy_(0, redo, converged);
  res.residual.index_copy_(0, redo, residual);
  res.path.index_copy_(0, redo, res.path.index_select(0, redo) | method_bit(Method::sequential));
  return res;
}

}  // namespace

NewtonResult newton_solve(const CellFunction& cell, const at::Tensor& gi, const at::Tensor& s0, const NewtonOptions& o) {
  const int64_t B = gi.size(0), T = gi.size(1), S = s0.size(1);
  TimeShards* shards = o.shards.get();
  const int64_t steps_all = shards ? shards->total() : T;  // the whole sequence's length
  // (Over time shards the ELK step has the diagonal part only: the op checked the method.)
  NewtonResult res;
  res.iterations = at::zeros({B}, s0.options().dtype(at::kLong));
  res.path = at::zeros({B}, s0.options().dtype(at::kLong));
  if (steps_all == 0 || B == 0 || S == 0 || o.method == Method::sequential) {
    return loop_result(cell, gi, s0, o, steps_all, std::move(res));
  }
  const at::Tensor gi_flat = flat(gi);
  const at::Tensor padding =
      o.lengths.defined() ? valid_steps(shard_lengths(o.lengths, T, shards), T, at::kBool).logical_not() : at::Tensor();
  Progress p{initial_states(cell, gi_flat, s0, T, o), at::Tensor(), res.iterations, at::Tensor(), at::Tensor(),
             res.path, at::zeros({B}, s0.options().dtype(at::kBool)), std::make_shared<Workspace>()};
  StagePlan plan;
  plan.method = o.method, plan.damping = o.damping;
  plan.atol = o.atol < 0 ? default_tolerance(s0.scalar_type()) : o.atol;
  plan.rtol = o.rtol < 0 ? default_tolerance(s0.scalar_type()) : o.rtol;
  if (o.method != Method::automatic) {
    plan.budget = o.max_iter < 0 ? std::min<int64_t>(steps_all, 100) : o.max_iter;
    run_stage(cell, gi_flat, s0, plan, o, padding, p);
  } else if (o.fixed_iterations) {
    // No host synchronisation: the first stage only, for exactly max_iter iterations.
    plan.method = auto_stages(cell, B * steps_all, shards != nullptr).front(), plan.budget = o.max_iter;
    run_stage(cell, gi_flat, s0, plan, o, padding, p);
  } else {
    run_auto(cell, gi_flat, s0, o, plan, steps_all, padding, p);
  }
  res.iterations = p.iterations, res.residual = p.residual, res.converged = p.converged, res.path = p.path;
  // Whether every sequence converged and whether one is stuck: one host read (fixed mode
  // reads nothing, and takes both as possible).
  bool all_converged = false, any_stuck = true;
  if (!o.fixed_iterations) {
    const at::Tensor flags = at::stack({res.converged.all(), p.stuck.any()}).cpu();
    all_converged = flags[0].item<bool>(), any_stuck = flags[1].item<bool>();
  }
  if (o.fallback && !o.fixed_iterations && !all_converged) return fall_back(cell, gi, s0, o, p, steps_all, std::move(res));
  // No fallback: a stuck sequence returns its exact prefix and its solution's non-finite
  // pattern (the states the iteration reset to finite values are no part of the answer).
  // (Fixed mode computes it unconditionally: it reads nothing back to the host.)
  at::Tensor states = p.s;
  if (any_stuck) {
    const at::Tensor pattern =
        nonfinite_pattern(p.r, block_width(cell.structure(), cell), o.resets, padding, shards) &
        p.stuck.view({B, 1, 1});
    states = states.masked_fill(pattern, NAN);
  }
  res.states = o.lengths.defined() ? held_states(states, s0, o.lengths, shards) : states;
  return res;
}

}  // namespace pnewton
