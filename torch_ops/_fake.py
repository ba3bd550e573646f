"""Fake (meta) kernels: output shapes, dtypes and strides for torch.compile and export."""
import torch


def _contiguous(t, shape=None):
    return t.new_empty(t.shape if shape is None else shape)


@torch.library.register_fake("pnewton::scan_diag")
def _scan_diag_fake(a, b, x0=None, reverse=False):
    torch._check(a.dim() == 3, lambda: f"pnewton.scan_diag: a must be [B, T, D], got {tuple(a.shape)}")
    torch._check(b.shape == a.shape, lambda: f"pnewton.scan_diag: b must have shape {tuple(a.shape)}, got {tuple(b.shape)}")
    return _contiguous(b)


@torch.library.register_fake("pnewton::scan_block")
def _scan_block_fake(A, b, x0=None, reverse=False, transpose=False):
    torch._check(A.dim() == 5, lambda: f"pnewton.scan_block: A must be [B, T, H, k, k], got {tuple(A.shape)}")
    torch._check(b.shape == A.shape[:4], lambda: f"pnewton.scan_block: b must have shape {tuple(A.shape[:4])}, got {tuple(b.shape)}")
    return _contiguous(b)


@torch.library.register_fake("pnewton::scan_diag_backward")
def _scan_diag_backward_fake(grad_x, a, x, x0, reverse):
    return _contiguous(a), _contiguous(x), _contiguous(x, (x.shape[0], x.shape[2]))


@torch.library.register_fake("pnewton::scan_block_backward")
def _scan_block_backward_fake(grad_x, A, x, x0, reverse, transpose):
    return _contiguous(A), _contiguous(x), _contiguous(x, (x.shape[0], x.shape[2], x.shape[3]))


@torch.library.register_fake("pnewton::newton_rnn")
def _newton_rnn_fake(cell, gi, W_hh, b_hh, s0, method="auto", max_iter=-1, atol=-1.0, rtol=-1.0, damping=0.0,
                     clip=0.0, init="zeros", init_states=None, fixed_iterations=False, fallback=True, adjoint="auto",
                     lengths=None, W_hr=None, resets=None):
    B, T = gi.shape[:2]
    torch._check(s0.dim() == 2, lambda: f"pnewton.newton_rnn: s0 must be [B, S], got {tuple(s0.shape)}")
    states = gi.new_empty(B, T, s0.shape[1])
    return (states, gi.new_empty(B, dtype=torch.long), gi.new_empty(B), gi.new_empty(B, dtype=torch.bool),
            gi.new_empty(B, dtype=torch.long))


@torch.library.register_fake("pnewton::newton_rnn_backward")
def _newton_rnn_backward_fake(grad_states, cell, gi, W_hh, b_hh, s0, states, adjoint="auto", lengths=None, W_hr=None,
                              resets=None):
    return (_contiguous(gi), _contiguous(W_hh), gi.new_empty(W_hh.shape[0]), _contiguous(s0),
            gi.new_empty(0) if W_hr is None else _contiguous(W_hr))


@torch.library.register_fake("pnewton::elk_step")
def _elk_step_fake(a, r, lam, smooth=True):
    return _contiguous(r)
