#include "csrc/solver/cells.h"

namespace pnewton {
namespace {

int64_t gates_of(CellKind kind) {
  switch (kind) {
    case CellKind::gru:
    case CellKind::diag_gru:
    case CellKind::head_gru: return 3;
    case CellKind::lstm:
    case CellKind::diag_lstm:
    case CellKind::lstm_proj:
    case CellKind::head_lstm: return 4;
    default: return 1;
  }
}

// 1 − x in one kernel (ATen's C++ `1 - x` is empty_like, fill_ and sub_: three passes).
at::Tensor one_minus(const at::Tensor& x) { return at::rsub(x, 1); }

at::Tensor sigmoid_grad(const at::Tensor& y) { return y * one_minus(y); }

// The (h, c) pair of an interleaved LSTM state [N, 2D] as two [N, D] views.
std::pair<at::Tensor, at::Tensor> split_lstm(const at::Tensor& s, int64_t D) {
  const at::Tensor pairs = s.view({s.size(0), D, 2});
  return {pairs.select(2, 0), pairs.select(2, 1)};
}

// Blocks [N, H, b, b] as the block-diagonal matrix [N, H·b, H·b].
at::Tensor block_diagonal(const at::Tensor& blocks) {
  const int64_t N = blocks.size(0), H = blocks.size(1), b = blocks.size(2);
  at::Tensor out = at::zeros({N, H, b, H, b}, blocks.options());
  out.diagonal(0, 1, 3).copy_(blocks.permute({0, 2, 3, 1}));
  return out.view({N, H * b, H * b});
}

at::Tensor interleave(const at::Tensor& h, const at::Tensor& c) {
  return at::stack({h, c}, 2).view({h.size(0), 2 * h.size(1)});
}

}  // namespace

CellKind parse_cell(const std::string& name) {
  if (name == "gru") return CellKind::gru;
  if (name == "lstm") return CellKind::lstm;
  if (name == "rnn_tanh") return CellKind::rnn_tanh;
  if (name == "rnn_relu") return CellKind::rnn_relu;
  if (name == "diag_gru") return CellKind::diag_gru;
  if (name == "diag_lstm") return CellKind::diag_lstm;
  if (name == "lstm_proj") return CellKind::lstm_proj;
  if (name == "head_gru") return CellKind::head_gru;
  if (name == "head_lstm") return CellKind::head_lstm;
  TORCH_CHECK(false, "pnewton.newton_rnn: cell must be one of gru, lstm, rnn_tanh, rnn_relu, diag_gru, diag_lstm, ",
              "lstm_proj, head_gru, head_lstm; got '", name, "'");
}

const char* cell_name(CellKind kind) {
  switch (kind) {
    case CellKind::gru: return "gru";
    case CellKind::lstm: return "lstm";
    case CellKind::rnn_tanh: return "rnn_tanh";
    case CellKind::rnn_relu: return "rnn_relu";
    case CellKind::diag_gru: return "diag_gru";
    case CellKind::diag_lstm: return "diag_lstm";
    case CellKind::lstm_proj: return "lstm_proj";
    case CellKind::head_gru: return "head_gru";
    case CellKind::head_lstm: return "head_lstm";
  }
  return "?";
}

CellShape cell_shape(const char* op, CellKind kind, const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh,
                     const c10::optional<at::Tensor>& W_hr) {
  const int64_t gates = gates_of(kind);
  const bool projected = kind == CellKind::lstm_proj;
  const bool diagonal = kind == CellKind::diag_gru || kind == CellKind::diag_lstm;
  const bool heads = kind == CellKind::head_gru || kind == CellKind::head_lstm;
  TORCH_CHECK(W_hr.has_value() == projected, op, ": W_hr (the projection) is ",
              projected ? "required by" : "only for", " cell 'lstm_proj'");
  CellShape shape;
  if (projected) {
    TORCH_CHECK(W_hh.dim() == 2 && W_hh.sym_size(0) % 4 == 0, op, ": W_hh of cell 'lstm_proj' must be [4 * hidden, ",
                "proj_size], got shape ", W_hh.sym_sizes());
    shape.hidden = W_hh.sym_size(0) / 4, shape.projection = W_hh.sym_size(1);
    TORCH_CHECK(W_hr->dim() == 2 && W_hr->sym_size(0) == shape.projection && W_hr->sym_size(1) == shape.hidden, op,
                ": W_hr must be [proj_size, hidden] = [", shape.projection, ", ", shape.hidden, "], got shape ",
                W_hr->sym_sizes());
  } else if (heads) {
    TORCH_CHECK(W_hh.dim() == 3 && W_hh.sym_size(1) == gates * W_hh.sym_size(2) && W_hh.sym_size(2) > 0, op,
                ": W_hh of cell '", cell_name(kind), "' must be [heads, ", gates, " * head_size, head_size] with ",
                "head_size > 0, got shape ", W_hh.sym_sizes());
    shape.hidden = W_hh.sym_size(0) * W_hh.sym_size(2);
  } else if (diagonal) {
    TORCH_CHECK(W_hh.dim() == 1 && W_hh.sym_size(0) % gates == 0, op, ": W_hh of cell '", cell_name(kind),
                "' must be a vector [", gates, " * hidden], got shape ", W_hh.sym_sizes());
    shape.hidden = W_hh.sym_size(0) / gates;
  } else {
    TORCH_CHECK(W_hh.dim() == 2 && W_hh.sym_size(0) == gates * W_hh.sym_size(1), op, ": W_hh of cell '",
                cell_name(kind), "' must be [", gates, " * hidden, hidden], got shape ", W_hh.sym_sizes());
    shape.hidden = W_hh.sym_size(1);
  }
  shape.gate_size = gates * shape.hidden;
  const bool lstm = kind == CellKind::lstm || kind == CellKind::diag_lstm || kind == CellKind::head_lstm;
  shape.state_size = lstm ? 2 * shape.hidden : projected ? shape.projection + shape.hidden : shape.hidden;
  if (b_hh.has_value()) {
    TORCH_CHECK(b_hh->dim() == 1 && b_hh->sym_size(0) == shape.gate_size, op, ": b_hh must be [", shape.gate_size,
                "], got shape ", b_hh->sym_sizes());
  }
  return shape;
}

Cell::Cell(CellKind kind, const at::Tensor& W_hh, const c10::optional<at::Tensor>& b_hh,
           const c10::optional<at::Tensor>& W_hr)
    : kind_(kind), W_(W_hh), gates_(gates_of(kind)) {
  const CellShape shape = cell_shape("pnewton.newton_rnn", kind, W_hh, b_hh, W_hr);
  D_ = shape.hidden.guard_int(__FILE__, __LINE__);
  P_ = shape.projection.guard_int(__FILE__, __LINE__);
  if (W_hr.has_value()) W_hr_ = *W_hr;
  if (b_hh.has_value()) b_ = *b_hh;
  // The diagonals of the square gate blocks of W_hh, [gates, D], contiguous once per solve
  // (the diagonal Jacobians read them every iteration; a strided view broadcasts slowly).
  if (heads()) {
    H_ = W_.size(0), k_ = W_.size(2);
    // (contiguous: the fused passes read it by pointer, and reshape returns a strided view
    // where it can, with one head or heads of one)
    const at::Tensor blocks = W_.view({H_, gates_, k_, k_});
    gate_diagonals_ = blocks.diagonal(0, 2, 3).transpose(0, 1).reshape({gates_, D_}).contiguous();
    head_columns_ = blocks.permute({1, 3, 0, 2}).contiguous();
  } else if (!diagonal_weights() && !is_projected()) {
    gate_diagonals_ = W_.view({gates_, D_, D_}).diagonal(0, 1, 2).contiguous();
  }
}

JacobianPart Cell::structure() const {
  if (kind_ == CellKind::diag_gru) return JacobianPart::diagonal;
  if (kind_ == CellKind::diag_lstm) return JacobianPart::block2;
  if (heads()) return JacobianPart::blocks;
  return JacobianPart::dense;
}

at::Tensor Cell::hidden_of(const at::Tensor& s) const {
  if (is_projected()) return s.narrow(-1, 0, P_);
  return is_lstm() ? s.unflatten(-1, {D_, 2}).select(-1, 0) : s;
}

// A head cell's gh [N, G·D] (gate-major, as torch.nn's) and the per-head layout [H, N, G·k]
// its batched GEMMs use.
namespace {
at::Tensor heads_to_gates(const at::Tensor& x, int64_t H, int64_t G, int64_t k) {
  return x.view({H, x.size(1), G, k}).permute({1, 2, 0, 3}).reshape({x.size(1), G * H * k});
}
at::Tensor gates_to_heads(const at::Tensor& x, int64_t H, int64_t G, int64_t k) {
  return x.view({x.size(0), G, H, k}).permute({2, 0, 1, 3}).reshape({H, x.size(0), G * k});
}
}  // namespace

at::Tensor Cell::head_product(const at::Tensor& h) const {
  const at::Tensor per_head = at::bmm(h.reshape({h.size(0), H_, k_}).transpose(0, 1), W_.transpose(1, 2));
  return heads_to_gates(per_head, H_, gates_, k_);
}

at::Tensor Cell::recurrent(const at::Tensor& h) const {
  if (heads()) {
    const at::Tensor gh = head_product(h);
    return b_.defined() ? gh + b_ : gh;
  }
  if (diagonal_weights()) {
    at::Tensor gh = W_.view({gates_, D_}) * h.unsqueeze(1);
    gh = gh.view({h.size(0), gates_ * D_});
    return b_.defined() ? gh + b_ : gh;
  }
  return at::linear(h, W_, b_.defined() ? c10::optional<at::Tensor>(b_) : c10::nullopt);
}

at::Tensor Cell::recurrent_vjp(const at::Tensor& grad_gh) const {
  if (heads()) {
    return at::bmm(gates_to_heads(grad_gh, H_, gates_, k_), W_).transpose(0, 1).reshape({grad_gh.size(0), D_});
  }
  if (diagonal_weights()) return (grad_gh.view({-1, gates_, D_}) * W_.view({gates_, D_})).sum(1);
  return at::matmul(grad_gh, W_);
}

at::Tensor Cell::weight_grad(const at::Tensor& grad_gh, const at::Tensor& h) const {
  if (heads()) {
    const at::Tensor h_heads = h.reshape({h.size(0), H_, k_}).transpose(0, 1);
    return at::bmm(gates_to_heads(grad_gh, H_, gates_, k_).transpose(1, 2), h_heads);
  }
  if (diagonal_weights()) return (grad_gh.view({-1, gates_, D_}) * h.unsqueeze(1)).sum(0).view({gates_ * D_});
  return at::matmul(grad_gh.t(), h);
}

at::Tensor Cell::scaled_gate(const at::Tensor& c, int64_t k, bool matrix) const {
  if (!matrix && !diagonal_weights()) return c * gate_diagonals_[k];
  if (heads()) return rows(c) * W_.view({H_, gates_, k_, k_}).select(1, k);
  const at::Tensor w = diagonal_weights() ? W_.view({gates_, D_})[k] : W_.narrow(0, k * D_, D_);
  if (diagonal_weights()) return matrix ? at::diag_embed(c * w) : c * w;
  return rows(c) * w;
}

at::Tensor Cell::rows(const at::Tensor& x) const {
  return heads() ? x.view({x.size(0), H_, k_, 1}) : x.unsqueeze(-1);
}

at::Tensor Cell::diagonal_matrix(const at::Tensor& x) const {
  return at::diag_embed(heads() ? x.view({x.size(0), H_, k_}) : x);
}

at::Tensor Cell::step(const at::Tensor& s, const at::Tensor& gi) const { return evaluate(s, gi, std::nullopt).F; }

at::Tensor Cell::jacobian(const at::Tensor& s, const at::Tensor& gi, JacobianPart part) const {
  return evaluate(s, gi, part).J;
}

Cell::Evaluation Cell::evaluate(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const {
  if (fusable(s, gi, part)) {
    Iteration it = fused(s, gi, part, nullptr, nullptr);
    return {it.F, it.J};
  }
  return evaluate_aten(s, gi, part);
}

Cell::Evaluation Cell::evaluate_aten(const at::Tensor& s, const at::Tensor& gi, std::optional<JacobianPart> part) const {
  if (is_projected()) return evaluate_projected(s, gi, part);
  TORCH_CHECK(part != JacobianPart::blocks || heads(), "pnewton.newton_rnn: cell '", cell_name(kind_),
              "' has no Jacobian blocks per head (a head_gru or head_lstm cell has)");
  // A head cell forms the dense Jacobian as its blocks placed on the diagonal.
  if (heads() && part == JacobianPart::dense) {
    Evaluation e = evaluate_aten(s, gi, JacobianPart::blocks);
    e.J = block_diagonal(e.J);
    return e;
  }
  // Gates are computed once and serve both f and its Jacobian. matrix: the dense matrix or
  // a head cell's blocks.
  const bool matrix = part == JacobianPart::dense || part == JacobianPart::blocks;
  if (is_lstm()) {
    auto [h, c] = split_lstm(s, D_);
    const auto a = (gi + recurrent(h)).chunk(4, -1);
    const at::Tensor i = at::sigmoid(a[0]), f = at::sigmoid(a[1]), g = at::tanh(a[2]), o = at::sigmoid(a[3]);
    const at::Tensor c_new = f * c + i * g, tc = at::tanh(c_new);
    Evaluation e{interleave(o * tc, c_new), at::Tensor()};
    if (!part) return e;
    const at::Tensor dc_i = g * sigmoid_grad(i), dc_f = c * sigmoid_grad(f), dc_g = i * one_minus(g * g);
    const at::Tensor dh_dc = o * one_minus(tc * tc);  // ∂h'/∂c'
    auto dc_dh = [&](bool full) {
      return scaled_gate(dc_i, 0, full) + scaled_gate(dc_f, 1, full) + scaled_gate(dc_g, 2, full);
    };
    auto dh_dh = [&](bool full) {
      return scaled_gate(tc * sigmoid_grad(o), 3, full) + (full ? rows(dh_dc) : dh_dc) * dc_dh(full);
    };
    if (*part == JacobianPart::diagonal) {
      e.J = interleave(dh_dh(false), f);
    } else if (*part == JacobianPart::block2) {
      // [[∂h'_i/∂h_i, ∂h'_i/∂c_i], [∂c'_i/∂h_i, ∂c'_i/∂c_i]] per channel.
      e.J = at::stack({at::stack({dh_dh(false), dh_dc * f}, -1), at::stack({dc_dh(false), f}, -1)}, -2);
    } else {
      // Over the interleaved state: [N, D (out), 2, D (in), 2] dense, [N, H, k, 2, k, 2] per head.
      const at::Tensor hh = dh_dh(true);
      e.J = at::stack({at::stack({hh, diagonal_matrix(dh_dc * f)}, -1),
                       at::stack({dc_dh(true), diagonal_matrix(f)}, -1)},
                      hh.dim() - 1);
      e.J = heads() ? e.J.reshape({s.size(0), H_, 2 * k_, 2 * k_}) : e.J.reshape({s.size(0), 2 * D_, 2 * D_});
    }
    return e;
  }
  TORCH_CHECK(part != JacobianPart::block2, "pnewton.newton_rnn: 2x2 blocks (block_deer) need an LSTM cell, got '",
              cell_name(kind_), "'");
  if (kind_ == CellKind::rnn_tanh || kind_ == CellKind::rnn_relu) {
    const at::Tensor a = gi + recurrent(s);
    Evaluation e{kind_ == CellKind::rnn_tanh ? at::tanh(a) : at::relu(a), at::Tensor()};
    if (part) {
      const at::Tensor d = kind_ == CellKind::rnn_tanh ? one_minus(e.F.square()) : (a > 0).to(a.scalar_type());
      e.J = scaled_gate(d, 0, matrix);
    }
    return e;
  }
  const auto i = gi.chunk(3, -1), g = recurrent(s).chunk(3, -1);
  const at::Tensor r = at::sigmoid(i[0] + g[0]), z = at::sigmoid(i[1] + g[1]);
  const at::Tensor n = at::tanh(i[2] + r * g[2]);
  const at::Tensor one_minus_z = one_minus(z);
  Evaluation e{one_minus_z * n + z * s, at::Tensor()};
  if (!part) return e;
  const at::Tensor dn = one_minus_z * one_minus(n * n);  // ∂h'/∂(pre-activation of n)
  const at::Tensor J = scaled_gate(dn * r, 2, matrix) + scaled_gate(dn * g[2] * sigmoid_grad(r), 0, matrix) +
                       scaled_gate((s - n) * sigmoid_grad(z), 1, matrix);
  e.J = matrix ? J + diagonal_matrix(z) : J + z;
  return e;
}

Cell::Evaluation Cell::evaluate_projected(const at::Tensor& s, const at::Tensor& gi,
                                          std::optional<JacobianPart> part) const {
  const int64_t N = s.size(0);
  const at::Tensor h = s.narrow(1, 0, P_), c = s.narrow(1, P_, D_);
  const auto a = (gi + recurrent(h)).chunk(4, -1);
  const at::Tensor i = at::sigmoid(a[0]), f = at::sigmoid(a[1]), g = at::tanh(a[2]), o = at::sigmoid(a[3]);
  const at::Tensor c_new = f * c + i * g, tc = at::tanh(c_new);
  Evaluation e{at::cat({at::linear(o * tc, W_hr_), c_new}, 1), at::Tensor()};
  if (!part) return e;
  TORCH_CHECK(*part != JacobianPart::block2, "pnewton.newton_rnn: cell 'lstm_proj' has no 2x2 blocks (block_deer); ",
              "use quasi_deer, deer or auto");
  // ∂m/∂(gate pre-activations) for m = o ⊙ tanh(c'), gate order (i, f, g, o), [N, 4, D];
  // then ∂h'/∂h = W_hr · ∂m/∂gates · W_hh, ∂h'/∂c = W_hr diag(o (1 − tanh² c') f), ∂c'/∂c = diag(f).
  const at::Tensor dm_dc = o * one_minus(tc * tc);
  const at::Tensor dc_gates = at::stack({g * sigmoid_grad(i), c * sigmoid_grad(f), i * one_minus(g * g)}, 1);
  const at::Tensor dm_gates = at::cat({dm_dc.unsqueeze(1) * dc_gates, (tc * sigmoid_grad(o)).unsqueeze(1)}, 1);
  const at::Tensor dc_gates4 = at::cat({dc_gates, at::zeros_like(dc_gates.narrow(1, 0, 1))}, 1);
  const at::Tensor W = W_.view({4, D_, P_});
  if (*part == JacobianPart::diagonal) {
    // diag(∂h'/∂h)_p = Σ_{k,d} ∂m_d/∂gate_k · W_k[d, p] W_hr[p, d]: one GEMM against W ⊙ W_hrᵀ.
    const at::Tensor M = (W * W_hr_.t().unsqueeze(0)).reshape({4 * D_, P_});
    e.J = at::cat({at::matmul(dm_gates.reshape({N, 4 * D_}), M), f}, 1);
    return e;
  }
  // Dense [N, S, S] over [h | c]: ∂·/∂h through the gates (a [N, D, P] contraction per row).
  const at::Tensor dc_dh = at::einsum("nkd,kdp->ndp", {dc_gates4, W});
  const at::Tensor dm_dh = at::einsum("nkd,kdp->ndp", {dm_gates, W});
  const at::Tensor dh_dh = at::matmul(W_hr_, dm_dh);
  const at::Tensor dh_dc = W_hr_ * (dm_dc * f).unsqueeze(1);
  e.J = at::cat({at::cat({dh_dh, dh_dc}, 2), at::cat({dc_dh, at::diag_embed(f)}, 2)}, 1);
  return e;
}

Cell::Vjp Cell::vjp_projected(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const {
  const at::Tensor h = s.narrow(1, 0, P_), c = s.narrow(1, P_, D_);
  const at::Tensor v_h = v.narrow(1, 0, P_), v_c = v.narrow(1, P_, D_);
  const auto a = (gi + recurrent(h)).chunk(4, -1);
  const at::Tensor i = at::sigmoid(a[0]), f = at::sigmoid(a[1]), g = at::tanh(a[2]), o = at::sigmoid(a[3]);
  const at::Tensor tc = at::tanh(f * c + i * g);
  const at::Tensor v_m = at::matmul(v_h, W_hr_);  // the cotangent of m = o ⊙ tanh(c')
  const at::Tensor dc = v_c + v_m * o * one_minus(tc * tc);
  const at::Tensor grad_gates = at::cat({dc * g * sigmoid_grad(i), dc * c * sigmoid_grad(f), dc * i * one_minus(g * g),
                                         v_m * tc * sigmoid_grad(o)},
                                        -1);
  return {at::cat({recurrent_vjp(grad_gates), dc * f}, 1), grad_gates, grad_gates, at::matmul(v_h.t(), o * tc)};
}

std::optional<Cell::Linearisation> Cell::linearise(const at::Tensor& s, const at::Tensor& gi,
                                                   const at::Tensor& carried) const {
  if (is_lstm() || is_projected() || diagonal_weights() || heads()) return std::nullopt;
  Linearisation l;
  if (kind_ == CellKind::rnn_tanh || kind_ == CellKind::rnn_relu) {
    const at::Tensor a = gi + recurrent(s);
    l.C = kind_ == CellKind::rnn_tanh ? one_minus(at::tanh(a).square()) : (a > 0).to(a.scalar_type());
  } else {
    const auto i = gi.chunk(3, -1), g = recurrent(s).chunk(3, -1);
    const at::Tensor r = at::sigmoid(i[0] + g[0]), z = at::sigmoid(i[1] + g[1]);
    const at::Tensor n = at::tanh(i[2] + r * g[2]);
    const at::Tensor dn = one_minus(z) * one_minus(n * n);  // ∂h'/∂(pre-activation of n)
    l.C = at::cat({dn * g[2] * sigmoid_grad(r), (s - n) * sigmoid_grad(z), dn * r}, -1);
    l.d = z;
  }
  if (carried.defined()) {
    l.C = l.C * carried;
    if (l.d.defined()) l.d = l.d * carried;
  }
  return l;
}

at::Tensor Cell::transpose_product(const Linearisation& l, const at::Tensor& v) const {
  const int64_t N = v.size(0);
  const at::Tensor scaled = (l.C.view({N, gates_, D_}) * v.unsqueeze(1)).view({N, gates_ * D_});
  at::Tensor out = at::mm(scaled, W_);
  return l.d.defined() ? out.addcmul_(l.d, v) : out;
}

Cell::Vjp Cell::vjp(const at::Tensor& s, const at::Tensor& gi, const at::Tensor& v) const {
  if (is_projected()) return vjp_projected(s, gi, v);
  if (std::optional<Vjp> fused = fused_vjp(s, gi, v)) return *fused;
  if (is_lstm()) {
    auto [h, c] = split_lstm(s, D_);
    auto [v_h, v_c] = split_lstm(v, D_);
    const auto a = (gi + recurrent(h)).chunk(4, -1);
    const at::Tensor i = at::sigmoid(a[0]), f = at::sigmoid(a[1]), g = at::tanh(a[2]), o = at::sigmoid(a[3]);
    const at::Tensor tc = at::tanh(f * c + i * g);
    const at::Tensor dc = v_c + v_h * o * one_minus(tc * tc);
    const at::Tensor grad_gates = at::cat({dc * g * sigmoid_grad(i), dc * c * sigmoid_grad(f), dc * i * one_minus(g * g),
                                           v_h * tc * sigmoid_grad(o)},
                                          -1);
    return {interleave(recurrent_vjp(grad_gates), dc * f), grad_gates, grad_gates};
  }
  if (kind_ == CellKind::rnn_tanh || kind_ == CellKind::rnn_relu) {
    const at::Tensor a = gi + recurrent(s);
    const at::Tensor da = kind_ == CellKind::rnn_tanh ? v * one_minus(at::tanh(a).square()) : v * (a > 0).to(a.scalar_type());
    return {recurrent_vjp(da), da, da};
  }
  const auto i = gi.chunk(3, -1), g = recurrent(s).chunk(3, -1);
  const at::Tensor r = at::sigmoid(i[0] + g[0]), z = at::sigmoid(i[1] + g[1]);
  const at::Tensor n = at::tanh(i[2] + r * g[2]);
  const at::Tensor da_n = v * one_minus(z) * one_minus(n * n);
  const at::Tensor da_r = da_n * g[2] * sigmoid_grad(r), da_z = v * (s - n) * sigmoid_grad(z);
  const at::Tensor grad_gh = at::cat({da_r, da_z, da_n * r}, -1);
  return {recurrent_vjp(grad_gh) + v * z, at::cat({da_r, da_z, da_n}, -1), grad_gh};
}

}  // namespace pnewton
