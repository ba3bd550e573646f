"""pnewton.scan_diag / pnewton.scan_block: against a float64 loop, gradcheck, opcheck,
torch.compile, strided views and bad input."""
import itertools

import pytest
import torch

import pnewton

# float64 results are compared at 1e-12 relative; the loop and the scan add the same
# terms in the same order except across time chunks, where rounding may differ slightly.
F64 = dict(rtol=1e-12, atol=1e-12)


def loop_scan(A, b, x0=None, reverse=False, transpose=False):
    """x_t = A_t x_{t-1} + b_t (block form, [B, T, H, k(, k)]) step by step in float64."""
    A, b = A.double(), b.double()
    B, T, H, k = b.shape
    s = torch.zeros(B, H, k, dtype=torch.float64) if x0 is None else x0.double().clone()
    out = torch.empty(B, T, H, k, dtype=torch.float64)
    for t in (reversed(range(T)) if reverse else range(T)):
        M = A[:, t].mT if transpose else A[:, t]
        s = (M @ s.unsqueeze(-1)).squeeze(-1) + b[:, t]
        out[:, t] = s
    return out


def loop_scan_diag(a, b, x0=None, reverse=False):
    x0 = None if x0 is None else x0.unsqueeze(-1)
    return loop_scan(a[..., None, None], b[..., None], x0, reverse).squeeze(-1)


def random_diag(B, T, D, dtype=torch.float64, with_x0=True, gen=None):
    # Multipliers in (-1.2, 1.2): long scans neither blow up nor vanish at once.
    a = (torch.rand(B, T, D, dtype=dtype, generator=gen) * 2.4 - 1.2)
    b = torch.randn(B, T, D, dtype=dtype, generator=gen)
    x0 = torch.randn(B, D, dtype=dtype, generator=gen) if with_x0 else None
    return a, b, x0


def random_block(B, T, H, k, dtype=torch.float64, with_x0=True, gen=None):
    A = torch.randn(B, T, H, k, k, dtype=dtype, generator=gen) * (0.9 / k**0.5)
    b = torch.randn(B, T, H, k, dtype=dtype, generator=gen)
    x0 = torch.randn(B, H, k, dtype=dtype, generator=gen) if with_x0 else None
    return A, b, x0


def long_random_block(B, T, H, k, gen=None):
    """random_block with entries capped at 1.05 in magnitude: scans of 10⁵ steps neither
    vanish nor explode."""
    A, b, x0 = random_block(B, T, H, k, gen=gen)
    return A / A.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1) * 1.05, b, x0


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("T", [1, 2, 31, 33, 257, 5000])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_x0", [False, True])
def test_scan_diag_matches_loop(T, reverse, with_x0, gen):
    a, b, x0 = random_diag(3, T, 5, with_x0=with_x0, gen=gen)
    torch.testing.assert_close(pnewton.scan_diag(a, b, x0, reverse=reverse), loop_scan_diag(a, b, x0, reverse), **F64)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("reverse,transpose", list(itertools.product([False, True], repeat=2)))
def test_scan_block_matches_loop(k, reverse, transpose, gen):
    A, b, x0 = random_block(2, 37, 3, k, gen=gen)
    got = pnewton.scan_block(A, b, x0, reverse=reverse, transpose=transpose)
    torch.testing.assert_close(got, loop_scan(A, b, x0, reverse, transpose), **F64)


def test_scan_block_dense_case_is_one_block(gen):
    # A dense recurrence of size D is H = 1, k = D; a block-diagonal dense matrix must
    # give the same states as its blocks scanned separately.
    A, b, x0 = random_block(2, 50, 4, 3, gen=gen)
    dense = torch.zeros(2, 50, 1, 12, 12, dtype=torch.float64)
    for h in range(4):
        dense[:, :, 0, 3 * h:3 * h + 3, 3 * h:3 * h + 3] = A[:, :, h]
    x_dense = pnewton.scan_block(dense, b.reshape(2, 50, 1, 12), x0.reshape(2, 1, 12))
    torch.testing.assert_close(x_dense.reshape(2, 50, 4, 3), pnewton.scan_block(A, b, x0), **F64)


def test_long_narrow_scan_is_chunked_over_time_correctly(gen):
    # B·D = 1 and a long T: the CPU cuts time into chunks; the answer must not change.
    a, b, x0 = random_diag(1, 20000, 1, gen=gen)
    torch.testing.assert_close(pnewton.scan_diag(a, b, x0), loop_scan_diag(a, b, x0), **F64)


def test_reverse_scan_equals_flipped_forward(gen):
    a, b, x0 = random_diag(2, 100, 4, gen=gen)
    flipped = pnewton.scan_diag(a.flip(1), b.flip(1), x0).flip(1)
    torch.testing.assert_close(pnewton.scan_diag(a, b, x0, reverse=True), flipped, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes_accumulate_in_fp32(dtype, gen):
    a, b, x0 = random_diag(2, 300, 8, dtype=torch.float32, gen=gen)
    a, b, x0 = a.to(dtype), b.to(dtype), x0.to(dtype)
    got = pnewton.scan_diag(a, b, x0)
    assert got.dtype == dtype
    expected = loop_scan_diag(a, b, x0).to(dtype)  # exact inputs, float64 loop, one rounding
    # One rounding of the result plus fp32 accumulation: a couple of ulps of the dtype.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_time_first_and_sliced_views_need_no_copy(gen):
    T, B, D = 64, 3, 6
    a_tf = torch.rand(T, B, D, dtype=torch.float64, generator=gen)
    b_tf = torch.randn(T, B, 2 * D, dtype=torch.float64, generator=gen)[..., ::2]
    a, b = a_tf.transpose(0, 1), b_tf.transpose(0, 1)
    assert not a.is_contiguous() and not b.is_contiguous()
    got = pnewton.scan_diag(a, b)
    assert got.is_contiguous()
    torch.testing.assert_close(got, loop_scan_diag(a.contiguous(), b.contiguous()), **F64)
    A, bb, _ = random_block(T, B, 2, 3, gen=gen)  # built time-first, read batch-first
    torch.testing.assert_close(
        pnewton.scan_block(A.transpose(0, 1), bb.transpose(0, 1), transpose=True),
        loop_scan(A.transpose(0, 1), bb.transpose(0, 1), transpose=True), **F64)


def test_empty_batch_and_empty_time():
    for B, T in [(0, 5), (3, 0)]:
        a, b, x0 = random_diag(B, T, 4)
        assert pnewton.scan_diag(a, b, x0).shape == (B, T, 4)
        A, bb, x0b = random_block(B, T, 2, 3)
        assert pnewton.scan_block(A, bb, x0b).shape == (B, T, 2, 3)


def test_multiplier_of_zero_restarts_from_b():
    a = torch.tensor([[[2.0], [0.0], [3.0]]], dtype=torch.float64)
    b = torch.tensor([[[1.0], [5.0], [1.0]]], dtype=torch.float64)
    # x = 2*x0 + 1 = 7, then 0*7 + 5 = 5, then 3*5 + 1 = 16.
    assert pnewton.scan_diag(a, b, torch.tensor([[3.0]], dtype=torch.float64)).flatten().tolist() == [7.0, 5.0, 16.0]


# ---- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_x0", [False, True])
def test_scan_diag_gradcheck(reverse, with_x0, gen):
    a, b, x0 = random_diag(2, 7, 3, with_x0=with_x0, gen=gen)
    inputs = [t.requires_grad_() for t in (a, b) + ((x0,) if with_x0 else ())]
    fn = (lambda a, b, x0: pnewton.scan_diag(a, b, x0, reverse=reverse)) if with_x0 else \
        (lambda a, b: pnewton.scan_diag(a, b, reverse=reverse))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reverse,transpose", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("k", [1, 3])
def test_scan_block_gradcheck(reverse, transpose, k, gen):
    A, b, x0 = random_block(2, 6, 2, k, gen=gen)
    inputs = [t.requires_grad_() for t in (A, b, x0)]
    assert torch.autograd.gradcheck(
        lambda A, b, x0: pnewton.scan_block(A, b, x0, reverse=reverse, transpose=transpose), inputs)


def test_gradient_through_strided_views(gen):
    a, b, x0 = random_diag(5, 4, 3, gen=gen)  # read as time-first views below
    inputs = [t.requires_grad_() for t in (a, b, x0)]
    assert torch.autograd.gradcheck(
        lambda a, b, x0: pnewton.scan_diag(a.transpose(0, 1)[:, :, ::2], b.transpose(0, 1)[:, :, ::2],
                                           x0[:4, ::2]), inputs)


def test_backward_of_long_scan_matches_autograd_of_loop(gen):
    a, b, x0 = random_diag(2, 3000, 2, gen=gen)
    g = torch.randn(2, 3000, 2, dtype=torch.float64, generator=gen)
    ours = [t.clone().requires_grad_() for t in (a, b, x0)]
    (pnewton.scan_diag(*ours) * g).sum().backward()
    ref = [t.clone().requires_grad_() for t in (a, b, x0)]
    (loop_scan_diag(*ref) * g).sum().backward()
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.grad, r.grad, rtol=1e-10, atol=1e-10)


# ---- operator contracts ------------------------------------------------------------------

def diag_samples():
    gen = torch.Generator().manual_seed(0)
    for reverse, with_x0 in itertools.product([False, True], repeat=2):
        a, b, x0 = random_diag(2, 9, 3, with_x0=with_x0, gen=gen)
        yield (a.requires_grad_(), b.requires_grad_(), x0.requires_grad_() if with_x0 else None, reverse)
    a, b, x0 = random_diag(2, 9, 3, dtype=torch.float32, gen=gen)
    yield (a, b, x0, False)


def block_samples():
    gen = torch.Generator().manual_seed(0)
    for reverse, transpose in itertools.product([False, True], repeat=2):
        A, b, x0 = random_block(2, 5, 2, 3, gen=gen)
        yield (A.requires_grad_(), b.requires_grad_(), x0.requires_grad_(), reverse, transpose)
    A, b, _ = random_block(1, 4, 1, 8, dtype=torch.float32, gen=gen)
    yield (A, b, None, True, False)


@pytest.mark.parametrize("args", list(diag_samples()))
def test_opcheck_scan_diag(args):
    torch.library.opcheck(torch.ops.pnewton.scan_diag.default, args)


@pytest.mark.parametrize("args", list(block_samples()))
def test_opcheck_scan_block(args):
    torch.library.opcheck(torch.ops.pnewton.scan_block.default, args)


def test_opcheck_backward_ops(gen):
    a, b, x0 = random_diag(2, 6, 3, gen=gen)
    x = pnewton.scan_diag(a, b, x0)
    for reverse in (False, True):
        torch.library.opcheck(torch.ops.pnewton.scan_diag_backward.default, (torch.randn_like(x), a, x, x0, reverse))
    A, bb, x0b = random_block(2, 6, 2, 3, gen=gen)
    xb = pnewton.scan_block(A, bb, x0b)
    for reverse, transpose in itertools.product([False, True], repeat=2):
        torch.library.opcheck(torch.ops.pnewton.scan_block_backward.default,
                              (torch.randn_like(xb), A, xb, None, reverse, transpose))


def test_torch_compile_fullgraph_forward_and_backward(gen):
    def model(a, b, x0, A, bb):
        x = pnewton.scan_diag(torch.sigmoid(a), b, x0)
        y = pnewton.scan_block(A, bb, reverse=True, transpose=True)
        return x.square().sum() + y.sum()

    a, b, x0 = random_diag(2, 16, 3, gen=gen)
    A, bb, _ = random_block(2, 16, 2, 2, gen=gen)
    eager_in = [t.clone().requires_grad_() for t in (a, b, x0, A, bb)]
    comp_in = [t.clone().requires_grad_() for t in (a, b, x0, A, bb)]
    eager = model(*eager_in)
    eager.backward()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")(*comp_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for e, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, e.grad)


# ---- bad input ---------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    a, b, x0 = random_diag(2, 5, 3)
    cases = [
        (lambda: pnewton.scan_diag(a[0], b), "a must be a 3-d tensor"),
        (lambda: pnewton.scan_diag(a, b[:, :, :2]), r"b must have shape \[B, T, D\] like a = \[2, 5, 3\], got \[2, 5, 2\]"),
        (lambda: pnewton.scan_diag(a, b.float()), "b must have the dtype of a"),
        (lambda: pnewton.scan_diag(a.int(), b.int()), "a must be float32, float64, float16 or bfloat16"),
        (lambda: pnewton.scan_diag(a, b, x0[:1]), r"x0 must have shape \[B, D\]"),
        (lambda: pnewton.scan_diag(a, b, x0.float()), "x0 must have the dtype of a"),
        (lambda: pnewton.scan_diag(a, b, x0[:, :, None]), r"x0 must have shape \[B, D\]"),
    ]
    A, bb, x0b = random_block(2, 5, 2, 3)
    cases += [
        (lambda: pnewton.scan_block(A[..., 0], bb), "A must be a 5-d tensor"),
        (lambda: pnewton.scan_block(A[..., :2], bb), "A must hold square blocks"),
        (lambda: pnewton.scan_block(A, bb[..., :2]), r"b must have shape \[B, T, H, k\]"),
        (lambda: pnewton.scan_block(A, bb, x0b[:, :1]), r"x0 must have shape \[B, H, k\]"),
        (lambda: pnewton.scan_block(A, bb.to(torch.bfloat16)), "b must have the dtype of A"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# ---- CUDA (skipped without a GPU) --------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 33, 4097, 70000])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_scan_diag_matches_cpu_float64(T, reverse, gen):
    a, b, x0 = random_diag(3, T, 70, gen=gen)
    expected = pnewton.scan_diag(a, b, x0, reverse=reverse)
    torch.testing.assert_close(pnewton.scan_diag(a.cuda(), b.cuda(), x0.cuda(), reverse=reverse).cpu(), expected, **F64)
    got32 = pnewton.scan_diag(a.float().cuda(), b.float().cuda(), x0.float().cuda(), reverse=reverse).cpu()
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["single_pass", "chunked"])
@pytest.mark.parametrize("T,H", [(1, 1), (4097, 1), (70001, 1), (129, 33), (1025, 3), (3000, 256)])
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_scan_algorithms_match_cpu_float64_at_tile_boundaries(algorithm, T, H, k, gen, monkeypatch):
    # single_pass tiles: C = min(32, 2^⌈log₂H⌉) channels × 256/C slices of 16 (k=1) or 8 steps.
    monkeypatch.setenv("PNEWTON_CUDA_SCAN", algorithm)
    A, b, x0 = long_random_block(2, T, H, k, gen=gen)
    for reverse, transpose in itertools.product([False, True], repeat=2):
        expected = pnewton.scan_block(A, b, x0, reverse=reverse, transpose=transpose)
        got = pnewton.scan_block(A.cuda(), b.cuda(), x0.cuda(), reverse=reverse, transpose=transpose).cpu()
        torch.testing.assert_close(got, expected, **F64)
        got32 = pnewton.scan_block(A.float().cuda(), b.float().cuda(), x0.float().cuda(), reverse=reverse,
                                   transpose=transpose).cpu().double()
        assert ((got32 - expected).norm() / expected.norm()).item() <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("k,steps", [(1, 8), (1, 32), (2, 4)])
def test_cuda_single_pass_steps_per_thread(k, steps, gen, monkeypatch):
    monkeypatch.setenv("PNEWTON_CUDA_SCAN", "single_pass")
    monkeypatch.setenv("PNEWTON_SINGLE_PASS_STEPS", str(steps))
    for T, H in [(70001, 1), (3001, 40)]:
        A, b, x0 = long_random_block(2, T, H, k, gen=gen)
        for reverse in (False, True):
            expected = pnewton.scan_block(A, b, x0, reverse=reverse)
            got = pnewton.scan_block(A.cuda(), b.cuda(), x0.cuda(), reverse=reverse).cpu()
            torch.testing.assert_close(got, expected, **F64)


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["single_pass", "chunked"])
@pytest.mark.parametrize("k", [1, 2, 12])
def test_cuda_scan_gradients_through_the_shifted_adjoint(algorithm, k, gen, monkeypatch):
    monkeypatch.setenv("PNEWTON_CUDA_SCAN", algorithm)
    A, b, x0 = (t.cuda().requires_grad_() for t in random_block(2, 300, 3, k, gen=gen))
    assert torch.autograd.gradcheck(lambda A, b, x0: pnewton.scan_block(A, b, x0, reverse=True), (A, b, x0),
                                    atol=1e-8)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 2, 4, 8, 9, 12, 16, 40])  # 9..16: the column aggregate; 40: doubling
@pytest.mark.parametrize("reverse,transpose", list(itertools.product([False, True], repeat=2)))
def test_cuda_scan_block_matches_cpu_float64(k, reverse, transpose, gen):
    A, b, x0 = random_block(2, 3000, 3, k, gen=gen)
    expected = pnewton.scan_block(A, b, x0, reverse=reverse, transpose=transpose)
    got = pnewton.scan_block(A.cuda(), b.cuda(), x0.cuda(), reverse=reverse, transpose=transpose).cpu()
    torch.testing.assert_close(got, expected, **F64)


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["single_pass", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype, algorithm, gen, monkeypatch):
    # Narrow storage, float32 accumulation: the result is the float64 scan of the rounded
    # inputs, rounded once.
    monkeypatch.setenv("PNEWTON_CUDA_SCAN", algorithm)
    a, b, x0 = (t.to(dtype) for t in random_diag(2, 5000, 64, dtype=torch.float32, gen=gen))
    got = pnewton.scan_diag(a.cuda(), b.cuda(), x0.cuda()).cpu()
    assert got.dtype == dtype
    torch.testing.assert_close(got, pnewton.scan_diag(a.double(), b.double(), x0.double()).to(dtype))
    A, bb, y0 = (t.to(dtype) for t in random_block(2, 3000, 5, 2, dtype=torch.float32, gen=gen))
    got = pnewton.scan_block(A.cuda(), bb.cuda(), y0.cuda(), transpose=True).cpu()
    torch.testing.assert_close(got, pnewton.scan_block(A.double(), bb.double(), y0.double(), transpose=True).to(dtype))


@pytest.mark.cuda
def test_cuda_gradcheck_and_device_mismatch(gen):
    A, b, x0 = (t.cuda().requires_grad_() for t in random_block(2, 40, 2, 3, gen=gen))
    assert torch.autograd.gradcheck(lambda A, b, x0: pnewton.scan_block(A, b, x0, transpose=True), (A, b, x0))
    with pytest.raises(RuntimeError, match="b must be on the device of A"):
        pnewton.scan_block(A.detach(), b.detach().cpu())
    a, bb, _ = random_diag(2, 5, 3)
    torch.library.opcheck(torch.ops.pnewton.scan_diag.default, (a.cuda(), bb.cuda(), None, True))
