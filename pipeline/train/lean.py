"""Activation-lean RMSNorm and SwiGLU MLP for Llama-family models (CPU fp32 training).

What autograd keeps for the backward of a stock decoder layer, per token (d = hidden, I = intermediate size):
- each RMSNorm keeps its input, 1/rms and the normalised input (2d + 1);
- the MLP keeps silu(gate), gate, up and their product (4I), besides the norm output its projections keep.

Two custom autograd functions keep less and recompute the rest (elementwise work only) in the backward:
- `_RMSNorm` keeps the input and 1/rms (d + 1) and rebuilds the normalised input;
- `_SwiGLUDown` spans silu(gate) * up and the down projection. It keeps gate and up (2I) and rebuilds the
  product, which the down projection's weight gradient needs.

That is d per norm and 2I per MLP fewer floats held per token and layer. SmolLM2-135M (d 576, I 1536, 30 layers)
holds 2 x 576 + 2 x 1536 = 4,224 fewer floats per token and layer (16.5 KB). The forward runs the same ops in the same order
as the stock modules, so its outputs are bitwise equal. The backward uses the analytic gradients, which agree
with autograd's to float rounding (tested to 1e-5).

Only the exact module classes listed below are patched: a family with a different norm (Gemma's 1 + w) or
activation is left alone. The patch is applied on the module instances, and the stock forward runs whenever it
cannot help or would not be exact: no grad (reference pass, eval, generation), a non-fp32 input, or autocast on.
The CUDA bf16 path therefore keeps the stock modules. The trainer does not apply it under gradient
checkpointing either: there no layer's activations outlive its backward, and on SmolLM2 lean measured 7-8 %
fewer tokens/s for the same peak (bench/trainer; without checkpointing it cut the peak by 320 MB, -9 %, at
1-2 % of tokens/s).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

NORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "SmolLM3RMSNorm"}
MLP_CLASSES = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "SmolLM3MLP"}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # the stock forward's ops, in its order (x is fp32 here, so its .to(float32) casts are no-ops)
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        n = x * rstd
        dw = (dy * n).reshape(-1, n.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dn = dy * weight
            dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx, dw, None


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        act = F.silu(gate)
        dw = db = None
        if ctx.needs_input_grad[2]:
            prod = act * up
            dw = dy.reshape(-1, dy.shape[-1]).t() @ prod.reshape(-1, prod.shape[-1])
            del prod
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        dprod = dy @ weight
        dup = dprod * act if ctx.needs_input_grad[1] else None
        del act
        # torch's own fused silu backward kernel: grad * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        dgate = torch.ops.aten.silu_backward(dprod * up, gate) if ctx.needs_input_grad[0] else None
        return dgate, dup, dw, db


def _lean_ok(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def _norm_forward(self, hidden_states):
    if not _lean_ok(hidden_states) or self.weight.dtype != torch.float32:
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    if not _lean_ok(x) or self.down_proj.weight.dtype != torch.float32:
        return type(self).forward(self, x)
    return _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)


def _mlp_patchable(m: torch.nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    # transformers' SiLUActivation (F.silu) or torch's own
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))


def apply(model: torch.nn.Module) -> int:
    """Patch the model's RMSNorm and SwiGLU MLP instances in place; returns how many were patched (0 = a
    family this module does not know, left as it was)."""
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name in NORM_CLASSES and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_norm_forward, m)
            n += 1
        elif name in MLP_CLASSES and _mlp_patchable(m):
            m.forward = types.MethodType(_mlp_forward, m)
            n += 1
    return n


def remove(model: torch.nn.Module) -> None:
    """Undo `apply` (the class's own forward again)."""
    for m in model.modules():
        if "forward" in vars(m) and getattr(m.forward, "__func__", None) in (_norm_forward, _mlp_forward):
            del m.forward
