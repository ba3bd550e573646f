"""Largest Lyapunov exponent along a trajectory: whether parallel Newton will pay.

A negative exponent (a contracting, predictable system) means Newton methods converge in
O(log T) iterations; a positive one (chaos) means about T, and the sequential loop wins
(DESIGN §1, "Predictability Enables Parallelization of Nonlinear State Space Models").
"""
import torch
from torch import nn

from .solve import _jacobian, _shift, solve

_CELLS = {"GRU": "gru", "LSTM": "lstm", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "DIAG_GRU": "diag_gru",
          "DIAG_LSTM": "diag_lstm"}


def _layer_problem(layer, s0, inputs):
    """(f, s0, gi) of the first layer's forward direction of a pnewton or torch.nn RNN layer:
    f is the built-in cell's step (torch.ops.pnewton.cell_step) on the input projections."""
    mode = layer.mode
    cell = getattr(layer, "_cell", None) or _CELLS[mode]  # pnewton's layers name their cell (DiagGRU, HeadGRU, ...)
    x = inputs if layer.batch_first else inputs.transpose(0, 1)
    W_ih, W_hh = layer.weight_ih_l0, layer.weight_hh_l0
    b_ih, b_hh = (layer.bias_ih_l0, layer.bias_hh_l0) if layer.bias else (None, None)
    gi = nn.functional.linear(x, W_ih, b_ih)
    S = layer.hidden_size * (2 if "LSTM" in mode else 1)
    if s0 is None:
        s0 = x.new_zeros(x.shape[0], S)
    return (lambda s, u: torch.ops.pnewton.cell_step(cell, s, u, W_hh, b_hh)), s0, gi


def lyapunov(f, s0, inputs, states=None, num_vectors=3, *, jacobian=None):
    """Per-sequence estimate of the largest Lyapunov exponent, per step (discrete time).

    Propagates ``num_vectors`` orthonormal directions through the Jacobians
    A_t = ∂f/∂s at (s_{t-1}, u_t) and re-orthonormalises them by QR at every step
    (Benettin's method); the exponent is the mean log growth of the leading direction.

    Args:
        f, s0, inputs: as for :func:`pnewton.solve`; or ``f`` a pnewton or torch.nn
            GRU/LSTM/RNN layer, ``inputs`` its input and ``s0`` its first layer's initial
            state ``[B, S]`` (None: zeros; LSTM: (h_i, c_i) interleaved): the exponent of
            its first layer's forward direction, through the built-in cell's step.
        states: the trajectory ``[B, T, D]``; solved with :func:`pnewton.solve` if None.
        num_vectors: directions propagated (more makes the leading one converge faster).
        jacobian: optional analytic Jacobian, as for :func:`pnewton.solve`.

    Returns:
        ``[B]`` tensor: λ ≈ (1/T) Σ_t log ‖A_t q_{t-1}‖ for the leading direction q. The
        start-up transient biases it by O(1/T).
    """
    if num_vectors < 1:
        raise ValueError(f"pnewton.lyapunov: num_vectors must be >= 1, got {num_vectors}")
    with torch.no_grad():
        if isinstance(f, nn.Module):
            if not hasattr(f, "weight_hh_l0") or getattr(f, "proj_size", 0):
                raise TypeError(f"pnewton.lyapunov: expected a step function or a GRU/LSTM/RNN layer, "
                                f"got {type(f).__name__}")
            f, s0, inputs = _layer_problem(f, s0, inputs)
        if states is None:
            states, _ = solve(f, s0, inputs)
        B, T, D = states.shape
        if T == 0:
            raise ValueError("pnewton.lyapunov: the sequence is empty (T = 0)")
        A = _jacobian(f, _shift(s0, states), inputs, jacobian)
        k = min(num_vectors, D)
        # Random (seeded) directions: axis-aligned ones can miss the leading direction.
        gen = torch.Generator(device=states.device).manual_seed(0)
        Q = torch.linalg.qr(torch.randn(B, D, k, dtype=states.dtype, device=states.device, generator=gen))[0]
        log_growth = torch.zeros(B, dtype=states.dtype, device=states.device)
        for t in range(T):
            Q, R = torch.linalg.qr(A[:, t] @ Q)
            # |R_00| is the stretch of the leading direction at this step (the floor keeps
            # log finite where a Jacobian maps it to exactly zero, e.g. a dead ReLU).
            log_growth += R[:, 0, 0].abs().clamp_min(torch.finfo(states.dtype).tiny).log()
        return log_growth / T
