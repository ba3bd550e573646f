// The built-in cells' fused passes (kernels/cell_fused.h): one pass per iteration writing
// f, the scanned Jacobian part, the residual and its per-step reductions, on the CPU (the
// at::vec loop, csrc/cpu/cell_kernels.cpp) or CUDA; and the backward's fused VJP (CUDA).
// cells.cpp keeps the ATen forms, the reference the tests compare these with.
#include "csrc/solver/cells.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cstdlib>
#include <cstring>

#include "csrc/cpu/cell_kernels.h"
#include "kernels/cell_fused.h"
#if PNEWTON_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "kernels/cell_fused_cuda.h"
#endif

namespace pnewton {

namespace {

// PNEWTON_FUSED_CELLS=0: the ATen form always (the reference the tests compare with).
// Read on every call: the tests switch it within one process.
bool fused_cells_enabled() {
  const char* env = std::getenv("PNEWTON_FUSED_CELLS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// The fused passes' name of a cell (the per-channel cells are their dense kin with diagonal weights).
FusedCell fused_cell_of(const Cell& cell) {
  if (cell.is_lstm()) return FusedCell::lstm;
  if (cell.kind() == CellKind::rnn_tanh) return FusedCell::rnn_tanh;
  return cell.kind() == CellKind::rnn_relu ? FusedCell::rnn_relu : FusedCell::gru;
}

// A fused pass's CUDA launch, launch(stream) -> cudaError_t, on the current stream; a build
// without CUDA kernels raises (the launch is a generic lambda, never instantiated there).
template <typename Launch>
void on_current_stream(Launch&& launch) {
#if PNEWTON_WITH_CUDA
  C10_CUDA_CHECK(launch(at::cuda::getCurrentCUDAStream()));
#else
  TORCH_CHECK(false, "pnewton: this build has no CUDA kernels (rebuild with nvcc available)");
#endif
}

}  // namespace

bool plain(const at::Tensor& t, const at::Tensor& like) {
  return t.layout() == at::kStrided && (t.is_cpu() || t.is_cuda()) && t.device() == like.device() &&
         t.scalar_type() == like.scalar_type() && !t.key_set().has_any(c10::functorch_transforms_ks);
}

bool Cell::fusable(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const {
  if (is_projected() || !fused_cells_enabled()) return false;
  if (part == JacobianPart::dense || (part == JacobianPart::block2 && !is_lstm())) {
    return false;
  }
  if (at::GradMode::is_enabled()) return false;
  if (s.scalar_type() != at::kFloat && s.scalar_type() != at::kDouble) return false;
  return plain(s, s) && plain(gi, s) && plain(W_, s) && (!b_.defined() || plain(b_, s));
}

Cell::Iteration Cell::fused(const at::Tensor& rows, const at::Tensor& gi, std::optional<JacobianPart> part,
                            const Shift* shift, Workspace* workspace) const {
  const int64_t N = rows.size(0), S = state_size();
  const at::Tensor s_c = rows.contiguous(), gi_c = gi.contiguous();
  const auto opts = s_c.options();
  // W_hh h without b_hh (the pass adds it: no broadcast copy before the GEMM); the
  // per-channel cells form w ⊙ h in the pass, and so does the CPU pass of a head cell (k
  // products per gate: a batched GEMM of k-wide heads and its layout copy cost more); on
  // CUDA a head cell's is one GEMM per head, placed in torch.nn's gate-major layout.
  const bool cpu = rows.is_cpu();
  auto recurrent_rows = [&](const at::Tensor& states) {
    if (diagonal_weights() || (heads() && cpu) || !states.defined()) return at::Tensor();
    if (heads()) return head_product(hidden_of(states));
    at::Tensor gh = empty_in(workspace, {states.size(0), gate_size()}, opts);
    return at::mm_out(gh, hidden_of(states), W_.t());
  };
  const at::Tensor gh = recurrent_rows(s_c);
  at::Tensor first, s0, pad, res;
  if (shift) {
    first = shift->first.contiguous(), s0 = shift->reset.defined() ? shift->s0.contiguous() : at::Tensor();
    pad = shift->padding.defined() ? shift->padding.contiguous() : at::Tensor();
    res = shift->reset.defined() ? shift->reset.contiguous() : at::Tensor();
  }
  const at::Tensor first_gh = recurrent_rows(first), s0_gh = recurrent_rows(s0);
  // The diagonal of each D×D gate block of W_hh (of each head's k×k blocks), [G, D]
  // (per-channel weights: W_hh itself).
  const at::Tensor w = diagonal_weights() ? W_.contiguous() : gate_diagonals_;
  const at::Tensor b = b_.defined() ? b_.contiguous() : at::Tensor();
  Iteration it;
  if (!shift || shift->F) it.F = empty_in(workspace, {N, S}, opts);
  if (part) {
    const int64_t b = block_size();  // a head's block
    it.J = *part == JacobianPart::diagonal ? empty_in(workspace, {N, S}, opts)
           : *part == JacobianPart::blocks ? empty_in(workspace, {N, H_, b, b}, opts)
                                           : empty_in(workspace, {N, D_, 2, 2}, opts);
  }
  // The row reductions come in partial results per row on CUDA (one per warp of a row).
#if PNEWTON_WITH_CUDA
  const int64_t parts = cpu ? 1 : fused_row_parts(D_);
#else
  const int64_t parts = 1;
#endif
  if (shift) {
    it.R = empty_in(workspace, {N, S}, opts);
    it.row_residual = empty_in(workspace, {N, parts}, opts), it.row_scale = empty_in(workspace, {N, parts}, opts);
    it.row_square = empty_in(workspace, {N, parts}, opts);
  }
  FusedCellParams p;
  p.cell = fused_cell_of(*this);
  p.part = !part                             ? FusedPart::none
           : *part == JacobianPart::diagonal ? FusedPart::diagonal
           : *part == JacobianPart::blocks   ? FusedPart::blocks
                                             : FusedPart::block2;
  p.heads = heads() ? head_columns_.const_data_ptr() : nullptr, p.k = k_;
  p.diagonal_weights = diagonal_weights();
  p.N = N, p.D = D_;
  p.gi = gi_c.const_data_ptr(), p.gh = data_or_null(gh), p.b = data_or_null(b), p.w = w.const_data_ptr();
  p.s = s_c.const_data_ptr();
  if (shift) {
    p.T = shift->T, p.current = s_c.const_data_ptr();
    p.first = first.const_data_ptr(), p.first_gh = data_or_null(first_gh);
    p.s0 = data_or_null(s0), p.s0_gh = data_or_null(s0_gh);
    p.padding = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
    p.reset = res.defined() ? res.const_data_ptr<bool>() : nullptr;
  }
  p.F = it.F.defined() ? it.F.mutable_data_ptr() : nullptr, p.J = it.J.defined() ? it.J.mutable_data_ptr() : nullptr;
  p.R = it.R.defined() ? it.R.mutable_data_ptr() : nullptr;
  p.row_residual = it.row_residual.defined() ? it.row_residual.mutable_data_ptr() : nullptr;
  p.row_scale = it.row_scale.defined() ? it.row_scale.mutable_data_ptr() : nullptr;
  p.row_square = it.row_square.defined() ? it.row_square.mutable_data_ptr() : nullptr;
  p.row_parts = parts;
  const DType dtype = rows.scalar_type() == at::kFloat ? DType::f32 : DType::f64;
  RECORD_FUNCTION("pnewton::fused_cell_pass", std::vector<c10::IValue>());  // benchmarks/bench_layers.py --split
  if (!cpu) {
    on_current_stream([&](auto stream) { return fused_cell_cuda(p, dtype, stream); });
  } else {
    // About 2^14 numbers per task of ATen's pool.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(gate_size(), 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { cpu::fused_cell_cpu(p, dtype, begin, end); });
  }
  if (shift) {  // [N] per row (NaN propagating: amax)
    it.row_residual = parts == 1 ? it.row_residual.view({N}) : it.row_residual.amax(1);
    it.row_scale = parts == 1 ? it.row_scale.view({N}) : it.row_scale.amax(1);
    it.row_square = parts == 1 ? it.row_square.view({N}) : it.row_square.sum(1);
  }
  return it;
}

std::optional<Cell::Iteration> Cell::iterate(const at::Tensor& states, const at::Tensor& s0, const at::Tensor& entering,
                                             const at::Tensor& gi, std::optional<JacobianPart> part,
                                             const at::Tensor& padding, const at::Tensor& reset, bool with_F,
                                             Workspace* workspace) const {
  const at::Tensor& first = entering.defined() ? entering : s0;
  if (!fusable(states, gi, part) || !plain(s0, states) || !plain(first, states)) return std::nullopt;
  const Shift shift{states.size(1), first, s0, padding, reset, with_F};
  return fused(states.flatten(0, 1), gi, part, &shift, workspace);
}

std::optional<at::Tensor> Cell::loop(const at::Tensor& gi, const at::Tensor& s0, const at::Tensor& resets,
                                     const at::Tensor& entering) const {
  const at::Tensor& first = entering.defined() ? entering : s0;
  if (!diagonal_weights() || !fusable(s0, gi, std::nullopt) || !plain(first, s0)) return std::nullopt;
  const int64_t B = gi.size(0), T = gi.size(1), S = state_size();
  at::Tensor out = at::empty({B, T, S}, s0.options());
  if (B == 0 || T == 0 || D_ == 0) return out;
  const at::Tensor gi_c = gi.contiguous(), first_c = first.contiguous(), s0_c = s0.contiguous();
  const at::Tensor w = W_.contiguous(), b = b_.defined() ? b_.contiguous() : at::Tensor();
  const at::Tensor reset = resets.defined() ? resets.contiguous() : at::Tensor();
  FusedCellParams p;
  p.cell = fused_cell_of(*this), p.part = FusedPart::none, p.diagonal_weights = true;
  p.N = B * T, p.D = D_, p.T = T;
  p.gi = gi_c.const_data_ptr(), p.w = w.const_data_ptr(), p.b = data_or_null(b);
  p.first = first_c.const_data_ptr(), p.s0 = s0_c.const_data_ptr();
  p.reset = reset.defined() ? reset.const_data_ptr<bool>() : nullptr;
  p.F = out.mutable_data_ptr();
  const DType dtype = s0.scalar_type() == at::kFloat ? DType::f32 : DType::f64;
  RECORD_FUNCTION("pnewton::fused_loop", std::vector<c10::IValue>());
  if (s0.is_cuda()) {
    on_current_stream([&](auto stream) { return fused_loop_cuda(p, dtype, stream); });
  } else {
    const int64_t tasks = B * ((D_ + cpu::kLoopChannels - 1) / cpu::kLoopChannels);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { cpu::fused_loop_cpu(p, dtype, begin, end); });
  }
  return out;
}

std::optional<Cell::Vjp> Cell::fused_vjp(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const {
  // CUDA only: on the CPU the scalar pass loses to ATen's vectorised ops (GRU, B = 4,
  // T = 2048, D = 64: backward 98 vs 73 ms, LSTM 1238 vs 338 ms on 2 threads).
  if (!s.is_cuda() || !fusable(s, gi, std::nullopt) || !plain(v, s)) return std::nullopt;
  const int64_t N = s.size(0), S = state_size();
  const at::Tensor s_c = s.contiguous(), gi_c = gi.contiguous(), v_c = v.contiguous();
  const auto opts = s_c.options();
  // W_hh h without b_hh (the pass adds it), for dense weights (a head cell's: one GEMM per
  // head, in torch.nn's gate-major layout).
  const at::Tensor gh = diagonal_weights() ? at::Tensor()
                        : heads()          ? head_product(hidden_of(s_c))
                                           : at::mm(hidden_of(s_c), W_.t());
  const at::Tensor w = diagonal_weights() ? W_.contiguous() : at::Tensor();
  const at::Tensor b = b_.defined() ? b_.contiguous() : at::Tensor();
  Vjp out;
  out.gi = at::empty({N, gate_size()}, opts);
  out.gh = kind_ == CellKind::gru || kind_ == CellKind::diag_gru ? at::empty({N, gate_size()}, opts) : out.gi;
  at::Tensor direct = at::empty({N, S}, opts);
  FusedVjpParams p;
  p.cell = fused_cell_of(*this);
  p.diagonal_weights = diagonal_weights();
  p.N = N, p.D = D_;
  p.gi = gi_c.const_data_ptr(), p.gh = data_or_null(gh), p.b = data_or_null(b), p.w = data_or_null(w);
  p.s = s_c.const_data_ptr(), p.v = v_c.const_data_ptr();
  p.grad_gi = out.gi.mutable_data_ptr(), p.grad_s = direct.mutable_data_ptr();
  p.grad_gh = out.gh.is_same(out.gi) ? nullptr : out.gh.mutable_data_ptr();
  const DType dtype = s.scalar_type() == at::kFloat ? DType::f32 : DType::f64;
  RECORD_FUNCTION("pnewton::fused_vjp_pass", std::vector<c10::IValue>());
  on_current_stream([&](auto stream) { return fused_vjp_cuda(p, dtype, stream); });
  if (diagonal_weights()) {
    out.s = direct;
  } else if (is_lstm()) {  // W_hh's path reaches h, the even entries of the interleaved state
    direct.view({N, D_, 2}).select(2, 0).add_(recurrent_vjp(out.gh));
    out.s = direct;
  } else if (heads()) {
    out.s = direct.add_(recurrent_vjp(out.gh));
  } else {
    out.s = at::addmm(direct, out.gh, W_);
  }
  return out;
}

}  // namespace pnewton
