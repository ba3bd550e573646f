#pragma once
// User cells in C++: derive from CellFunction, give the step f(s, u), and the solver runs
// it with any method; pnewton::solve returns states that are differentiable (by the exact
// adjoint) in s0, the inputs and every tensor the step uses, such as its parameters.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "pnewton/solver.h"

namespace pnewton {

// The part of ∂f/∂s that is formed: the diagonal [N, S], 2×2 blocks of consecutive state
// pairs [N, S/2, 2, 2], the dense matrix [N, S, S], or the cell's own k×k blocks of
// consecutive state entries [N, S/k, k, k] (k = CellFunction::block_size(): multi-head
// cells, one block per head). The values are the ints the ops pass (pnewton.solve's structure).
enum class JacobianPart { diagonal, block2, dense, blocks };

class CellFunction {
 public:
  virtual ~CellFunction() = default;
  virtual int64_t state_size() const = 0;
  // f(s [N, S], u [N, ...]) -> [N, S], batched over N rows (all steps of all sequences).
  virtual at::Tensor step(const at::Tensor& s, const at::Tensor& u) const = 0;
  // The structure of the true ∂f/∂s: what exact Newton (deer) and the adjoint form.
  virtual JacobianPart structure() const { return JacobianPart::dense; }
  // Whether block_deer may use 2×2 blocks of consecutive state pairs.
  virtual bool has_blocks() const {
    return structure() == JacobianPart::diagonal || structure() == JacobianPart::block2;
  }
  // k of JacobianPart::blocks, where structure() is blocks (k divides state_size()).
  virtual int64_t block_size() const { return 0; }
  // Whether the diagonal of a dense ∂f/∂s costs less to form than the whole: method auto
  // then starts with quasi_deer; where it costs the same (the diagonal taken from the whole
  // Jacobian, as pnewton.solve's torch.func does), with exact Newton while it is affordable.
  virtual bool cheap_diagonal() const { return true; }
  // ∂f/∂s in the given part. The default differentiates step() with autograd (S passes).
  virtual at::Tensor jacobian(const at::Tensor& s, const at::Tensor& u, JacobianPart part) const;
  // ∂f/∂sᵀ v. The default is one autograd pass through step().
  virtual at::Tensor transpose_product(const at::Tensor& s, const at::Tensor& u, const at::Tensor& v) const;

  struct Evaluation {
    at::Tensor F, J;
  };
  // f and, when a part is asked for, ∂f/∂s in it; override to share work between them.
  virtual Evaluation evaluate(const at::Tensor& s, const at::Tensor& u, std::optional<JacobianPart> part) const {
    return {step(s, u), part ? jacobian(s, u, *part) : at::Tensor()};
  }
};

// The width of the square blocks a part is made of: 1 (diagonal), 2, the cell's k, or S (dense).
inline int64_t block_width(JacobianPart part, const CellFunction& cell) {
  switch (part) {
    case JacobianPart::diagonal: return 1;
    case JacobianPart::block2: return 2;
    case JacobianPart::blocks: return cell.block_size();
    case JacobianPart::dense: return cell.state_size();
  }
  return 0;
}

// Solves s_t = f(s_{t-1}, u_t) for a user cell: s0 [B, S], inputs [B, T, ...]. Methods and
// options as for the built-in cells (block_deer needs has_blocks()). The cell must outlive
// the backward pass of the returned states.
std::tuple<at::Tensor, SolveStats> solve(const CellFunction& cell, const at::Tensor& s0, const at::Tensor& inputs,
                                         const SolverOptions& options = {});

}  // namespace pnewton
