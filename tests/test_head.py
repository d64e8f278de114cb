"""The token-chunked LM head equals the plain log_softmax(h @ W.T).gather path: values and gradients."""
from __future__ import annotations

import pytest
import torch

from pipeline.train.head import chunked_logprobs, plain_logprobs

SHAPES = [(1, 50, 31), (37, 123, 64), (1000, 517, 31), (37, 517, 64), (1000, 50, 64)]


def _inputs(n, v, h, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h ** 0.5
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)  # a non-uniform upstream gradient exercises the per-token scaling
    return hid, w, b, t, up


def _run(fn, hid, w, b, t, up, **kw):
    hid = hid.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    out = fn(hid, w, t, bias=b, **kw)
    (out * up).sum().backward()
    return out.detach(), hid.grad, w.grad, (b.grad if b is not None else None)


def _compare(got, ref, tol):
    assert got[0].dtype == torch.float32
    for name, a, r in zip(["logps", "d_hidden", "d_weight", "d_bias"], got, ref):
        if r is None:
            assert a is None
            continue
        err = (a - r).abs().max().item()
        bound = tol(r)
        assert err <= bound, f"{name}: max |diff| {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("chunk", [7, 256])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_plain_fp32(n, v, h, chunk, bias):
    """Upstream gradient of a mean loss over the N tokens (what the trainer's losses produce): 1e-5 absolute."""
    hid, w, b, t, up = _inputs(n, v, h, bias)
    args = (hid, w, b, t, up / n)
    _compare(_run(chunked_logprobs, *args, chunk_tokens=chunk), _run(plain_logprobs, *args), lambda r: 1e-5)


@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("chunk", [7, 256])
def test_chunked_equals_plain_fp32_unit_upstream(n, v, h, chunk):
    """Unit upstream gradients make dW a sum of N O(1) terms (|dW| up to ~20 here), where fp32 itself is off
    by ~1e-5 from fp64 (the plain path too); so the bound is 1e-5 relative to the gradient's scale."""
    args = _inputs(n, v, h, bias=True)
    _compare(_run(chunked_logprobs, *args, chunk_tokens=chunk), _run(plain_logprobs, *args),
             lambda r: 1e-5 * max(1.0, r.abs().max().item()))


def test_chunked_matches_fp64_reference_loss():
    """A loss built on the head (mean logp) vs an fp64 computation of the same loss."""
    hid, w, b, t, _ = _inputs(333, 123, 31, bias=False, seed=3)
    out = chunked_logprobs(hid, w, t, chunk_tokens=100).mean()
    ref = plain_logprobs(hid.double(), w.double(), t).mean()
    assert abs(out.item() - ref.item()) <= 1e-6


def test_no_grad_needed_for_hidden_only_weight():
    hid, w, b, t, up = _inputs(20, 50, 31, bias=False)
    w = w.clone().requires_grad_(True)
    (chunked_logprobs(hid, w, t, chunk_tokens=6) * up).sum().backward()
    w_ref = w.detach().clone().requires_grad_(True)
    (plain_logprobs(hid, w_ref, t) * up).sum().backward()
    assert (w.grad - w_ref.grad).abs().max().item() <= 1e-5


def test_empty_selection_gives_zero_grads():
    hid = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    out = chunked_logprobs(hid, w, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert w.grad is not None and torch.count_nonzero(w.grad).item() == 0


def test_shape_errors():
    with pytest.raises(ValueError, match="shapes"):
        chunked_logprobs(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("n,chunk", [(1, 1), (37, 1), (37, 36), (37, 37), (37, 38)])
def test_chunk_edges(n, chunk):
    hid, w, b, t, up = _inputs(n, 123, 31, bias=True, seed=n)
    args = (hid, w, b, t, up / n)
    _compare(_run(chunked_logprobs, *args, chunk_tokens=chunk), _run(plain_logprobs, *args), lambda r: 1e-5)


@pytest.mark.parametrize("n,chunk", [(37, 256), (37, 7)])
def test_second_backward_recomputes_the_cached_chunk(n, chunk):
    """The forward keeps its last chunk's softmax for the first backward, which consumes it in place; a second
    backward through the same graph (retain_graph) must recompute it and give the same gradients."""
    hid, w, b, t, up = _inputs(n, 123, 64, bias=True)
    hid.requires_grad_(True)
    w.requires_grad_(True)
    out = chunked_logprobs(hid, w, t, bias=b, chunk_tokens=chunk)
    first = torch.autograd.grad((out * up).sum(), (hid, w), retain_graph=True)
    second = torch.autograd.grad((out * up).sum(), (hid, w))
    ref = _run(plain_logprobs, hid.detach(), w.detach(), b, t, up)
    for a, c, r in zip(first, second, ref[1:3]):
        assert (a - r).abs().max().item() <= 1e-5
        assert (c - r).abs().max().item() <= 1e-5
