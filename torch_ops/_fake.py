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
