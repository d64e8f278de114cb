"""Token-chunked LM head + log-softmax: per-token log-probs without ever holding the [N, V] logits.

The trainer gathers the hidden states of the scored (completion) positions only, so `hidden` is [N, H] with
N = number of completion tokens in the micro-batch. The forward walks N in chunks: logits of one chunk in the
compute dtype, logsumexp and the target logit in fp32. The backward recomputes each chunk's logits (memory is
the point, not FLOPs), except the last chunk's, whose exp(z - max) the forward keeps (the backward comes right
after it), and accumulates the weight gradient across chunks in fp32.

d logp_i / d z_ij = 1[j = y_i] - softmax(z_i)_j, so for an upstream gradient g_i the logits gradient of a
chunk is g_i * (onehot - p); dH = dZ @ W and dW = dZ^T @ H.

Two kernels do the elementwise work on each chunk's logits (`kernel=`):
  torch   fp32 copy of the chunk, then separate torch ops; the only one on CPU.
  triton  head_triton.py: one fused pass per direction, reading the logits in their own dtype (bf16 under
          autocast) with fp32 arithmetic, and writing the logits gradient in place: no fp32 [chunk, V] buffer.
  auto    (default) triton when the tensors are on CUDA and triton imports, else torch.
"""
from __future__ import annotations

import os

import torch

DEFAULT_CHUNK_TOKENS = 1024
KERNELS = ("auto", "torch", "triton")


def _triton_module():
    try:
        from pipeline.train import head_triton
    except ImportError as e:  # no triton in this environment
        return None, e
    return head_triton, None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'torch' or 'triton' for tensors on `device` (see the module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"head kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return kernel
    if kernel == "auto" and device.type != "cuda":
        return "torch"
    mod, err = _triton_module()
    if kernel == "auto":
        return "triton" if mod is not None else "torch"
    if mod is None:
        raise ImportError(f"head kernel triton asked for but triton does not import: {err}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"head kernel triton needs CUDA tensors (got {device.type}; or set TRITON_INTERPRET=1 "
                         "before import to run it in Triton's interpreter)")
    return kernel


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    # Under autocast (the CUDA bf16 path) the head GEMMs run in the autocast dtype, like the rest of the model.
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = h @ w.T
    if b is not None:
        z += b
    return z


def _fp32_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits as a fresh fp32 buffer that the caller may overwrite in place."""
    return _chunk_logits(h, w, b).float()


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, kernel):  # type: ignore[override]
        cdt = _compute_dtype(weight)
        fused = _triton_module()[0] if kernel == "triton" else None
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.to(cdt)
            b = bias.to(cdt) if bias is not None else None
            n = hidden.shape[0]
            logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            last = None
            for s in range(0, n, chunk_tokens):
                e = min(s + chunk_tokens, n)
                last = z = None  # the previous chunk's buffer goes before this one is allocated
                if fused is not None:  # one read of the compute-dtype logits, kept as they are
                    z = _chunk_logits(hidden[s:e].to(cdt), w, b)
                    chunk_lse, target_logit = fused.lse_and_target(z, targets[s:e])
                    lse[s:e] = chunk_lse
                    logps[s:e] = target_logit - chunk_lse
                    last = (s, z, None)
                    continue
                z = _fp32_logits(hidden[s:e].to(cdt), w, b)
                target_logit = z.gather(1, targets[s:e, None]).squeeze(1)
                # logsumexp in place on the one [chunk, V] buffer (torch.logsumexp would allocate a second)
                m = z.amax(dim=-1, keepdim=True)
                total = z.sub_(m).exp_().sum(dim=-1)
                chunk_lse = total.log().add_(m.squeeze(1))
                lse[s:e] = chunk_lse
                logps[s:e] = target_logit - chunk_lse
                last = (s, z, total)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_tokens, ctx.cdt, ctx.fused = chunk_tokens, cdt, fused
        # The last chunk's exp(z - max) and its row sums stay for the backward, which starts right after the
        # loss: that chunk's logits are not recomputed (one [chunk, V] GEMM of its four; with N <= chunk_tokens,
        # the only chunk). Little else is live between the head's forward and its backward, so the peak holds.
        ctx.last = last  # under no_grad there is no graph and ctx (with it) is dropped at once
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cdt, chunk_tokens = ctx.cdt, ctx.chunk_tokens
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.to(cdt)
            b = bias.to(cdt) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            # fp32 accumulators across chunks: a bf16 running sum would lose the small per-chunk terms.
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            g_all = grad_logps.float()
            last, ctx.last = ctx.last, None  # used once: a second backward (retain_graph) recomputes
            for s in reversed(range(0, hidden.shape[0], chunk_tokens)):  # the cached last chunk first
                e = min(s + chunk_tokens, hidden.shape[0])
                h = hidden[s:e].to(cdt)
                g = g_all[s:e]
                # softmax, then dz = g * (onehot - p), in place on one [chunk, V] buffer: the compute-dtype logits
                # in one Triton kernel, or (torch) an fp32 copy and separate ops
                if ctx.fused is not None:  # in place on the compute-dtype logits, in one kernel
                    z = last[1] if last is not None and last[0] == s else _chunk_logits(h, w, b)
                    last = None
                    dz = ctx.fused.dlogits_inplace(z, targets[s:e], lse[s:e], g)
                elif last is not None and last[0] == s:
                    dz = last[1].mul_((-g / last[2])[:, None])  # exp(z - max) / its row sum = p
                    last = None
                else:
                    dz = _fp32_logits(h, w, b).sub_(lse[s:e, None]).exp_().mul_(-g[:, None])
                if ctx.fused is None:
                    dz.scatter_add_(1, targets[s:e, None], g[:, None])
                if need_b:
                    grad_b += dz.float().sum(0)
                dz_c = dz.to(cdt)
                if need_h:
                    grad_h[s:e] = (dz_c @ w).to(hidden.dtype)
                if need_w:
                    if cdt == torch.float32:
                        grad_w.addmm_(dz_c.T, h)  # accumulate without a [V, H] temporary
                    else:
                        grad_w += (dz_c.T @ h).float()
        return (grad_h,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None, None)


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     bias: torch.Tensor | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                     kernel: str = "auto") -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[i, targets[i]] for each row i, as fp32 [N].

    hidden [N, H] (only the positions to score), weight [V, H], bias [V] or None, targets [N] int64;
    kernel: auto | torch | triton (module docstring).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes do not fit: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N = {hidden.shape[0]}")
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    kernel = resolve_kernel(kernel, hidden.device)
    return _ChunkedLogProbs.apply(hidden, weight, bias, targets.long(), chunk_tokens, kernel)


def plain_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused reference path: full logits, fp32 log_softmax, gather. For tests and benchmarks."""
    z = _chunk_logits(hidden, weight, bias).float()
    return torch.log_softmax(z, dim=-1).gather(1, targets.long()[:, None]).squeeze(1)
