#pragma once
// One stage of the solver: a method run for a budget of iterations from where the solve
// stands (csrc/solver/stage.cpp). The driver (newton.cpp) runs one stage, or auto's.
#include <ATen/ATen.h>

#include <memory>

#include "csrc/solver/newton.h"
#include "csrc/solver/workspace.h"

namespace pnewton {

// Where a solve stands: the states, the cell at them (F = f(s_{t−1}, u_t)), and the
// per-sequence diagnostics. stuck: the sequence cannot converge (its solution is not
// finite, or a trust region stays non-finite), so it takes no more steps.
struct Progress {
  // r: the residual s − f(s) at the states s [B, T, S] (zero on padding).
  at::Tensor s, r, iterations, residual, converged, path, stuck;
  std::shared_ptr<Workspace> workspace;  // the solve's reused buffers
  // Where the last stage started: its states, the residual there, and its maximum.
  struct Entry {
    at::Tensor s, r, residual;
  } entry;
};

struct StagePlan {
  Method method = Method::quasi_deer;
  int64_t budget = 0;
  bool stop_on_stall = false;  // end once ½‖r‖² stops halving (auto's stages)
  double damping = 0;          // κ, or the ELK λ (0: adaptive)
  double atol = 0, rtol = 0;
};

// Runs plan.method for at most plan.budget iterations from p.s; converged sequences keep
// their states. On return p holds the residual at the final states. padding [B, T] (bool)
// or undefined.
void run_stage(const CellFunction& cell, const at::Tensor& gi_flat, const at::Tensor& s0, const StagePlan& plan,
               const NewtonOptions& o, const at::Tensor& padding, Progress& p);

}  // namespace pnewton
