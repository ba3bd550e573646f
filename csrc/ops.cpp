// Every pnewton schema, in one place. Kernels live one folder per dispatch key:
// csrc/cpu, csrc/cuda, csrc/meta, csrc/autograd (the solver's ops register theirs beside
// their kernels in csrc/solver). Every kernel, meta included, checks its arguments with
// csrc/checks.h.
#include <torch/library.h>

TORCH_LIBRARY(pnewton, m) {
  // x_t = a_t ⊙ x_{t-1} + b_t over [B, T, D] (reverse: x_t = a_t ⊙ x_{t+1} + b_t).
  m.def("scan_diag(Tensor a, Tensor b, Tensor? x0=None, bool reverse=False) -> Tensor");
  // x_t = A_t x_{t-1} + b_t per block: A [B, T, H, k, k], b [B, T, H, k] (A_tᵀ if transpose).
  m.def("scan_block(Tensor A, Tensor b, Tensor? x0=None, bool reverse=False, bool transpose=False) -> Tensor");
  // Backward passes: the adjoint is the transposed scan run the other way, one step shifted.
  // They return (grad_a, grad_b, grad_x0); grad_x0 is returned even when x0 was None.
  m.def("scan_diag_backward(Tensor grad_x, Tensor a, Tensor x, Tensor? x0, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "scan_block_backward(Tensor grad_x, Tensor A, Tensor x, Tensor? x0, bool reverse, bool transpose) -> "
      "(Tensor, Tensor, Tensor)");

  // The same over a time axis sharded across the ranks of the process group named `group`
  // (torch.distributed's group.group_name): each rank passes its contiguous shard [B, T_r, ...]
  // (T_r may differ, even be 0) and gets its shard of x; x0 enters the whole sequence (the
  // first shard; the last when reverse). One gather per call, of size independent of T
  // (csrc/distributed/time_shards.h). Differentiable; every rank must run the backward.
  m.def("scan_diag_sharded(Tensor a, Tensor b, str group, Tensor? x0=None, bool reverse=False) -> Tensor");
  m.def(
      "scan_block_sharded(Tensor A, Tensor b, str group, Tensor? x0=None, bool reverse=False, "
      "bool transpose=False) -> Tensor");
  // [collectives, bytes of their results] this process ran over time shards since the last
  // reset (benchmarks/bench_distributed.py).
  m.def("shard_traffic(bool reset=False) -> int[]");
  // Raises `message` (an error of `op`'s argument checks on this rank) on every rank of
  // `group`, in the call the other ranks are making: this rank's part of their agreement
  // (TimeShards::agree), for checks made before any op of the call (the layers' own).
  m.def("shards_raise(str group, str op, str message) -> ()");

  // The ELK (Levenberg–Marquardt) step by Kalman filtering and smoothing, for the generic
  // solver: a is the diagonal [B, T, S] or the dense [B, T, S, S] Jacobian approximation,
  // r [B, T, S] the residual, lam [B] > 0 the damping; smooth=False: filter means only.
  m.def("elk_step(Tensor a, Tensor r, Tensor lam, bool smooth=True) -> Tensor");

  // The parallel Newton solver for the built-in cells (csrc/solver). gi [B, T, G] is the
  // input projection for all t; s0 [B, S] the initial state (LSTM: (h_i, c_i) interleaved).
  // Returns the states [B, T, S] and per-sequence diagnostics: iterations (int64),
  // residual, converged (bool) and path (int64: bit i set when method i of
  // the Method enum in csrc/solver/newton.h moved the sequence; bit 5 is the sequential loop). Negative max_iter/atol/rtol: defaults.
  // lengths [B] (integers in [0, T]): steps t >= lengths[b] are padding, outside the residual
  // and the gradients, and the states hold still there (csrc/solver/segments.h). W_hr: the
  // projection [P, D] of cell lstm_proj (torch.nn.LSTM's proj_size; state [h | c], S = P + D).
  // resets [B, T] (bool): segments packed end to end in a row; a true step starts a new
  // segment from s0, with nothing carried across (csrc/solver/segments.h).
  // group: sequence parallelism (csrc/distributed/time_shards.h): gi, init_states and resets
  // are this rank's time shard, s0 enters the whole sequence, states are this rank's shard;
  // the diagnostics are the whole sequence's, alike on every rank. reversed_ranks: shards
  // in the reverse of rank order. The gradients of W_hh, b_hh, s0 (W_hr) are this shard's
  // part: their sum over the group is the whole gradient.
  m.def(
      "newton_rnn(str cell, Tensor gi, Tensor W_hh, Tensor? b_hh, Tensor s0, str method=\"auto\", "
      "int max_iter=-1, float atol=-1.0, float rtol=-1.0, float damping=0.0, float clip=0.0, "
      "str init=\"zeros\", Tensor? init_states=None, bool fixed_iterations=False, bool fallback=True, "
      "str adjoint=\"auto\", Tensor? lengths=None, Tensor? W_hr=None, Tensor? resets=None, str group=\"\", "
      "bool reversed_ranks=False) -> (Tensor states, "
      "Tensor iterations, Tensor residual, Tensor converged, Tensor path)");
  // A stack of recurrent layers (torch.nn's GRU/LSTM/RNN semantics), each layer and direction
  // one newton_rnn solve; params per (layer, direction): W_ih, W_hh[, b_ih, b_hh][, W_hr] (as
  // torch's _VF.lstm: a fifth (third) tensor per layer is LSTM's projection). input is
  // [T, B, in] ([B, T, in] if batch_first), state0 [layers·dirs, B, S]; lengths [B] as for
  // newton_rnn (outputs past a length are zero, as in torch.nn's padded packed output; the
  // reverse direction starts at each sequence's own end); resets [B, T] as for newton_rnn (the
  // reverse direction reads each segment backwards). Composite: autograd flows through
  // its parts. Diagnostics per (layer, direction) and sequence: [layers·dirs, B] each.
  m.def(
      "rnn_stack(str cell, Tensor input, Tensor state0, Tensor[] params, bool has_biases, int num_layers, "
      "float dropout, bool train, bool bidirectional, bool batch_first, str method=\"auto\", int max_iter=-1, "
      "float atol=-1.0, float rtol=-1.0, float damping=0.0, float clip=0.0, str init=\"zeros\", "
      "bool fixed_iterations=False, bool fallback=True, str adjoint=\"auto\", Tensor? lengths=None, "
      "Tensor? resets=None, str group=\"\") -> (Tensor output, Tensor final, Tensor iterations, Tensor residual, Tensor converged, "
      "Tensor path)");
  // What the library was built with, as "key=value" lines (version, torch, cuda,
  // cuda_archs, cpu_capabilities, compiler, build_type): pnewton.show_config().
  m.def("build_info() -> str[]");
  // The solver's options checked as every solver op checks them (a ValueError naming the
  // option): the layers call it at construction and before torch.nn's forward runs a call.
  m.def(
      "check_solver_options(str method=\"auto\", int max_iter=-1, float atol=-1.0, float rtol=-1.0, "
      "float damping=0.0, float clip=0.0, str init=\"zeros\", bool fixed_iterations=False, bool fallback=True, "
      "str adjoint=\"auto\") -> ()");
  // pnewton.solve (torch_ops/solve.py) on the C++ solver: the step and Jacobian of a Python
  // function, called back through these two ops, whose kernels torch_ops registers in
  // Python; `handle` names the function for the duration of one call. part: 0 the diagonal
  // [N, S], 2 the dense Jacobian [N, S, S] (JacobianPart). structure as part: the true
  // Jacobian's.
  m.def("user_step(int handle, Tensor s, Tensor u) -> Tensor");
  m.def("user_jacobian(int handle, Tensor s, Tensor u, int part) -> Tensor");
  // The solve of such a function (csrc/solver/callback_cell.cpp): newton_rnn's solver,
  // options and diagnostics; init_states: the warm start of init="states".
  m.def(
      "solve_user(int handle, int structure, Tensor s0, Tensor inputs, str method=\"auto\", int max_iter=-1, "
      "float atol=-1.0, float rtol=-1.0, float damping=0.0, float clip=0.0, str init=\"zeros\", "
      "Tensor? init_states=None, bool fallback=True, bool cheap_diagonal=True) -> (Tensor states, "
      "Tensor iterations, Tensor residual, Tensor converged, Tensor path)");
  // Its adjoint λ_t = g_t + A_{t+1}ᵀ λ_{t+1} at the solution: s_prev [B·T, S] the state each
  // step read, u [B·T, ...], g [B, T, S] (solve_adjoint).
  m.def("solve_user_adjoint(int handle, int structure, Tensor s_prev, Tensor u, Tensor g, str adjoint=\"auto\") -> Tensor");
  // One step of a built-in cell, s' = f(s, gi) for rows s [N, S], gi [N, G]: the map the
  // solver iterates, for diagnostics such as pnewton.lyapunov. Composite (differentiable).
  m.def("cell_step(str cell, Tensor s, Tensor gi, Tensor W_hh, Tensor? b_hh, Tensor? W_hr=None) -> Tensor");
  // Exact gradients at the solution (the adjoint with the true Jacobian); grad_b_hh is
  // returned even when b_hh is None, grad_W_hr is empty without W_hr.
  m.def(
      "newton_rnn_backward(Tensor grad_states, str cell, Tensor gi, Tensor W_hh, Tensor? b_hh, Tensor s0, "
      "Tensor states, str adjoint=\"auto\", Tensor? lengths=None, Tensor? W_hr=None, Tensor? resets=None, "
      "str group=\"\", bool reversed_ranks=False) -> "
      "(Tensor grad_gi, Tensor grad_W_hh, Tensor grad_b_hh, Tensor grad_s0, Tensor grad_W_hr)");
}
