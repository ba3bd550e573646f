#pragma once
// The built-in cells of the Newton solver, over ATen ops (one implementation for CPU and
// CUDA): the step f, its analytic Jacobian ∂f/∂s in the part a method needs, and its
// vector-Jacobian product. Rows are flattened steps: s [N, S], gi [N, G].
//
// State layouts: gru, rnn_*, diag_gru, head_gru: s = h [N, D]. lstm, diag_lstm, head_lstm:
// s = (h_i, c_i) interleaved per channel, [N, 2D] viewed as [N, D, 2], so the 2×2 (h_i, c_i)
// blocks of block_deer are contiguous, and so are a head's 2k entries. lstm_proj
// (torch.nn.LSTM with proj_size P): s = [h | c], [N, P + D], h = W_hr (o ⊙ tanh c) of size
// P, W_hh [4D, P], W_hr [P, D]; its Jacobian is dense with no 2×2 blocks. gi is the input
// projection W_ih x_t + b_ih with torch.nn's gate order. Recurrent weights are [G, D] matrices, [G] vectors for the diag_* cells
// (per-channel recurrences, so their Jacobians are exactly diagonal / 2×2 block-diagonal),
// or [H, G·k, k] for the head_* cells: H heads of k channels (D = H·k), head h's rows in
// the gate order over its k channels, so that gh = W h + b_hh is torch.nn's with the dense
// W_hh[g·D + h·k + j, h·k + m] = W[h, g·k + j, m] (zero off the heads); their Jacobians are
// k×k blocks (head_gru) or 2k×2k blocks over a head's interleaved (h, c) (head_lstm).
#include <ATen/ATen.h>

#include <string>

#include "csrc/solver/workspace.h"
#include "pnewton/cell.h"

namespace pnewton {

enum class CellKind { gru, lstm, rnn_tanh, rnn_relu, diag_gru, diag_lstm, lstm_proj, head_gru, head_lstm };

CellKind parse_cell(const std::string& name);
const char* cell_name(CellKind kind);

// The sizes W_hh (W_hr for lstm_proj) imply, after checking W_hh, b_hh and W_hr against the
// cell: symbolic, so the meta kernels check and shape with it too.
struct CellShape {
  c10::SymInt hidden = 0, projection = 0;  // projection: lstm_proj's P, else 0
  c10::SymInt gate_size = 0, state_size = 0;
};
CellShape cell_shape(const char* op, CellKind kind, const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh,
                     const c10::optional<at::Tensor>& W_hr);

// A dense CPU or CUDA tensor on like's device, of like's dtype, that no torch.func transform
// wraps: what the fused passes read by pointer.
bool plain(const at::Tensor& t, const at::Tensor& like);

class Cell : public CellFunction {
 public:
  // Checks W_hh, b_hh (and W_hr, the projection of lstm_proj only) against the cell and
  // the hidden size D they imply.
  Cell(CellKind kind, const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh,
       const c10::optional<at::Tensor>& W_hr = c10::nullopt);

  CellKind kind() const { return kind_; }
  int64_t hidden() const { return D_; }
  const at::Tensor& weight() const { return W_; }
  const at::Tensor& projection() const { return W_hr_; }  // lstm_proj's W_hr, else undefined
  bool is_projected() const { return kind_ == CellKind::lstm_proj; }
  int64_t state_size() const override { return is_lstm() ? 2 * D_ : is_projected() ? P_ + D_ : D_; }
  int64_t gate_size() const { return gates_ * D_; }
  bool is_lstm() const {
    return kind_ == CellKind::lstm || kind_ == CellKind::diag_lstm || kind_ == CellKind::head_lstm;
  }
  bool diagonal_weights() const { return kind_ == CellKind::diag_gru || kind_ == CellKind::diag_lstm; }
  bool heads() const { return kind_ == CellKind::head_gru || kind_ == CellKind::head_lstm; }
  JacobianPart structure() const override;
  bool has_blocks() const override { return is_lstm(); }
  int64_t block_size() const override { return heads() ? (is_lstm() ? 2 : 1) * k_ : 0; }

  // f(s, gi) and, when a part is asked for, ∂f/∂s in that part, from one gate evaluation:
  // one fused pass after the recurrent GEMM (kernels/cell_fused.h), f alone or with the
  // diagonal or 2×2 blocks, float32/64 on the CPU (vectorised) and CUDA, outside autograd
  // (grad mode off, no torch.func transform); ATen ops otherwise (dense Jacobians,
  // lstm_proj, autograd). PNEWTON_FUSED_CELLS=0 takes the ATen form always (the tests'
  // reference).
  Evaluation evaluate(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const override;

  // One Newton iteration's evaluation in the same fused pass, where it applies: at the
  // states [B, T, S], each step reading the previous one (its sequence's `entering` state
  // [B, S] at t = 0, s0 [B, S] at `reset` steps; undefined entering: s0), F = f(previous,
  // gi) where with_F (the solver's Newton steps read R only: at B = 16, T = 65536, D = 64
  // F is 0.27 GB written per evaluation, and a buffer less per live evaluation), J in
  // `part` (zero at reset steps), R = states − F (zero on `padding` steps), and
  // per step max |R|, max |F| (NaN propagating) and Σ R², the merit's part ([B·T], 0 on
  // padding). padding, reset:
  // [B·T] bool or undefined. The previous states are read in place, never copied; the
  // outputs (and the GEMM's) are buffers of `workspace` when one is given. nullopt where the
  // pass does not apply (then: evaluate and ATen ops).
  struct Iteration {
    at::Tensor F, J, R, row_residual, row_scale, row_square;
  };
  std::optional<Iteration> iterate(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& entering,
                                   const at::Tensor& gi, std::optional<JacobianPart> part, const at::Tensor& padding,
                                   const at::Tensor& reset, bool with_F, Workspace* workspace = nullptr) const;
  // The step-by-step loop's states [B, T, S] of a per-channel cell (diag_gru, diag_lstm) in
  // one fused pass (kernels/cell_fused.h, fused_loop_channel): gi [B, T, G], from `entering`
  // (undefined: s0), s0 at `reset` steps ([B, T] bool or undefined): the math of single
  // fused steps. nullopt where it does not apply (other cells, or where the fused pass does
  // not: then the loop of steps).
  std::optional<at::Tensor> loop(const at::Tensor& gi, const at::Tensor& s0, const at::Tensor& resets,
                                 const at::Tensor& entering) const;
  at::Tensor step(const at::Tensor& s, const at::Tensor& gi) const override;
  at::Tensor jacobian(const at::Tensor& s, const at::Tensor& gi, JacobianPart part) const override;
  at::Tensor transpose_product(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const override {
    return vjp(s, gi, v).s;
  }

  // The true Jacobian at rows (s, gi) as A = diag(d) + Σ_k diag(c_k) W_k, k over the gate
  // blocks W_k of W_hh, for the cells with a dense W_hh and no projection (gru, rnn_*; else
  // nullopt): C = [c_1 … c_G] [N, G·D], d [N, D] (undefined: zero). Formed once (rows
  // scaled by `carried` [N, 1] where given), it makes every Aᵀv one GEMM: the iterative
  // adjoint's sweeps then recompute no gate.
  struct Linearisation {
    at::Tensor C, d;
  };
  std::optional<Linearisation> linearise(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& carried) const;
  at::Tensor transpose_product(const Linearisation& l, const at::Tensor& v) const;

  // For a cotangent v of f(s, gi): ∂f/∂sᵀ v, and the cotangents of gi and of the
  // recurrent pre-activations gh = W_hh h + b_hh (for the weight gradients); lstm_proj
  // also the gradient of W_hr summed over the rows.
  struct Vjp {
    at::Tensor s, gi, gh, W_hr;
  };
  Vjp vjp(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const;
  // Gradients of W_hh and b_hh from the gh cotangents [N, G] and the hidden states h [N, D].
  at::Tensor weight_grad(const at::Tensor& grad_gh, const at::Tensor& h) const;
  // The hidden part h of states [..., S].
  at::Tensor hidden_of(const at::Tensor& s) const;

 private:
  // The VJP in one fused CUDA pass (kernels/cell_fused.h) after W_hh's GEMM, where the
  // pass applies (as `fusable`, on CUDA); nullopt elsewhere.
  std::optional<Vjp> fused_vjp(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const;
  // Whether the fused pass applies to these tensors and this part.
  bool fusable(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const;
  // The fused pass. Without `shift`: rows [N, S] are the states each row reads, F and J
  // only. With it: rows are the steps' own states (iterate), F written only where F is set.
  struct Shift {
    int64_t T;
    at::Tensor first, s0, padding, reset;
    bool F;
  };
  Iteration fused(const at::Tensor& rows, const at::Tensor& gi, std::optional<JacobianPart> part,
                  const Shift* shift, Workspace* workspace) const;
  // The same in ATen ops: any part, differentiable, and the reference of the fused one.
  Evaluation evaluate_aten(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const;
  at::Tensor recurrent(const at::Tensor& h) const;              // gh [N, G]
  at::Tensor head_product(const at::Tensor& h) const;           // a head cell's W_hh h [N, G], no b_hh
  at::Tensor recurrent_vjp(const at::Tensor& grad_gh) const;    // [N, D]
  // diag(c) · ∂gh_k/∂h for gate block k: its diagonal [N, D], or as matrices: [N, D, D], or
  // a head cell's blocks [N, H, k, k].
  at::Tensor scaled_gate(const at::Tensor& c, int64_t k, bool matrix) const;
  // x [N, D] as the row scaling (rows) and the diagonal (diagonal_matrix) of scaled_gate's matrices.
  at::Tensor rows(const at::Tensor& x) const;
  at::Tensor diagonal_matrix(const at::Tensor& x) const;
  Evaluation evaluate_projected(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const;
  Vjp vjp_projected(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const;

  CellKind kind_;
  at::Tensor W_, b_, W_hr_;
  at::Tensor gate_diagonals_;  // [gates, D]: the diagonals of W_hh's square gate blocks
  // Head cells: W_hh as columns [gates, k, D], C[g][c][h·k + j] = W[h, g·k + j, c], which the
  // fused CPU pass reads (kernels/cell_fused.h, FusedCellParams::heads).
  at::Tensor head_columns_;
  int64_t D_, gates_, P_ = 0;
  int64_t H_ = 1, k_ = 0;  // head cells: H heads of k channels
};

}  // namespace pnewton
