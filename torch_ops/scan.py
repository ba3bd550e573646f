"""Linear recurrences solved by parallel scans: the inner step of every Newton method."""
import torch


def scan_diag(a, b, x0=None, *, reverse=False):
    """Diagonal linear recurrence over ``[B, T, D]``.

    Forward: ``x[:, t] = a[:, t] * x[:, t-1] + b[:, t]`` for t = 0..T-1, with
    ``x[:, -1] = x0`` (zeros when ``x0`` is None). With ``reverse=True`` time runs
    backwards: ``x[:, t] = a[:, t] * x[:, t+1] + b[:, t]`` with ``x[:, T] = x0``.

    ``a`` and ``b`` are ``[B, T, D]``, ``x0`` is ``[B, D]``, all of one dtype (float32,
    float64, or float16/bfloat16 accumulated in float32) and device. Any strides are
    accepted (e.g. a time-first tensor ``.transpose(0, 1)``); the result is contiguous.
    Differentiable in ``a``, ``b`` and ``x0``: the backward is the transposed scan run
    the other way.
    """
    return torch.ops.pnewton.scan_diag(a, b, x0, reverse)


def scan_block(A, b, x0=None, *, reverse=False, transpose=False):
    """Block-diagonal linear recurrence: ``x[:, t, h] = A[:, t, h] @ x[:, t-1, h] + b[:, t, h]``.

    ``A`` is ``[B, T, H, k, k]`` (H independent k x k blocks per step), ``b`` is
    ``[B, T, H, k]``, ``x0`` is ``[B, H, k]``. ``transpose=True`` uses ``A[:, t, h].mT``;
    ``reverse=True`` runs time backwards as in :func:`scan_diag`. A dense recurrence of
    small size D is ``H = 1, k = D``. Differentiable in ``A``, ``b`` and ``x0``.
    """
    return torch.ops.pnewton.scan_block(A, b, x0, reverse, transpose)
