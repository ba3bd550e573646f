// The solver's options, parsed and checked in one place: every solver op (newton_rnn,
// rnn_stack, solve_user), pnewton::solve and the layers' constructors (check_solver_options)
// read them through newton_options, whichever path then runs. A bad value is a ValueError
// naming the option, as torch.nn's constructor errors are.
#include <torch/library.h>

#include "csrc/solver/newton.h"

namespace pnewton {

Method parse_method(const std::string& name) {
  if (name == "deer") return Method::deer;
  if (name == "quasi_deer") return Method::quasi_deer;
  if (name == "block_deer") return Method::block_deer;
  if (name == "picard") return Method::picard;
  if (name == "jacobi") return Method::jacobi;
  if (name == "sequential") return Method::sequential;
  if (name == "elk") return Method::elk;
  if (name == "quasi_elk") return Method::quasi_elk;
  if (name == "elk_filter") return Method::elk_filter;
  if (name == "quasi_elk_filter") return Method::quasi_elk_filter;
  if (name == "auto") return Method::automatic;
  TORCH_CHECK_VALUE(false, "pnewton: method must be one of auto, deer, quasi_deer, block_deer, elk, quasi_elk, ",
              "elk_filter, quasi_elk_filter, picard, jacobi, sequential; got '", name, "'");
}

Adjoint parse_adjoint(const std::string& name) {
  if (name == "auto") return Adjoint::automatic;
  if (name == "scan") return Adjoint::scan;
  if (name == "iterative") return Adjoint::iterative;
  if (name == "sequential") return Adjoint::sequential;
  TORCH_CHECK_VALUE(false, "pnewton: adjoint must be one of auto, scan, iterative, sequential; got '", name, "'");
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
  TORCH_CHECK_VALUE(s.max_iter >= -1, op, ": max_iter must be >= 0 (or -1 for the default), got ", s.max_iter);
  TORCH_CHECK_VALUE(!s.fixed_iterations || s.max_iter >= 0, op, ": fixed_iterations needs an explicit max_iter >= 0");
  TORCH_CHECK_VALUE(s.atol >= 0 || s.atol == -1.0, op, ": atol must be >= 0, got ", s.atol);
  TORCH_CHECK_VALUE(s.rtol >= 0 || s.rtol == -1.0, op, ": rtol must be >= 0, got ", s.rtol);
  NewtonOptions o;
  o.method = parse_method(s.method);
  if (is_elk(o.method)) {
    TORCH_CHECK_VALUE(s.damping >= 0 && s.damping <= kLambdaMax, op, ": damping (the ELK λ) must be in [0, ", kLambdaMax,
                "] (0 = adaptive), got ", s.damping);
  } else {
    TORCH_CHECK_VALUE(s.damping >= 0 && s.damping < 1, op, ": damping must be in [0, 1), got ", s.damping);
  }
  TORCH_CHECK_VALUE(s.clip >= 0, op, ": clip must be >= 0 (0 = off), got ", s.clip);
  TORCH_CHECK_VALUE(s.init == "zeros" || s.init == "one_step" || s.init == "states", op,
              ": init must be zeros, one_step or states, got '", s.init, "'");
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

double default_tolerance(at::ScalarType dtype) { return dtype == at::kDouble ? 1e-12 : 3e-7; }

namespace {

void check_solver_options(c10::string_view method, int64_t max_iter, double atol, double rtol, double damping,
                          double clip, c10::string_view init, bool fixed_iterations, bool fallback,
                          c10::string_view adjoint) {
  newton_options(solver_options(method, max_iter, atol, rtol, damping, clip, init, fixed_iterations, fallback, adjoint));
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CatchAll, m) { m.impl("check_solver_options", &check_solver_options); }

}  // namespace pnewton
