"""Triton kernels for the chunked LM head: the elementwise work on one chunk's logits, fused.

The torch path of `head.py` turns each [chunk, V] logits block into fp32 and then runs max, subtract, exp, sum,
log (forward) and subtract, exp, multiply, scatter, cast (backward) as separate kernels over it. At an LM head's
shape (V in the tens of thousands, H in the hundreds) those passes over memory cost more than the GEMMs. Here
each is one kernel that reads the logits once in their own dtype (bf16 under autocast), does the arithmetic in
fp32 registers and writes nothing [chunk, V]-sized in the forward and the logits gradient in place in the
backward:

  lse_rows     per row: an online logsumexp over V (running max and rescaled sum, fp32) and the target logit.
  dlogits_rows per row, in place: z_j <- g * (1[j = y] - exp(z_j - lse)), stored back in z's dtype.

One program handles one row and walks V in BLOCK columns (2,048 by default; see FWD_WARPS).
`TRITON_INTERPRET=1` (set before triton is imported) runs the same kernels on CPU tensors through Triton's
interpreter: that is how the tests check them on a machine without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_rows(z_ptr, stride, tgt_ptr, lse_ptr, tlogit_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only padding keep m = -inf and s = 0 (exp(-inf - -inf) would be nan)
        live = m_new > float("-inf")
        m_safe = tl.where(live, m_new, 0.0)
        s = tl.where(live, s * tl.exp(m - m_safe) + tl.exp(x - m_safe), 0.0)
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - mx), axis=0)
    tl.store(lse_ptr + row, mx + tl.log(total))
    t = tl.load(tgt_ptr + row)
    tl.store(tlogit_ptr + row, tl.load(base + t).to(tl.float32))


@triton.jit
def _dlogits_rows(z_ptr, stride, tgt_ptr, lse_ptr, g_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    t = tl.load(tgt_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        keep = cols < V
        x = tl.load(base + cols, mask=keep, other=0.0).to(tl.float32)
        dz = -g * tl.exp(x - lse)
        dz = tl.where(cols == t, dz + g, dz)
        if z_ptr.dtype.element_ty == tl.bfloat16:
            # round to nearest even by hand: the GPU's cast does this too, Triton's interpreter truncates
            bits = dz.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(base + cols, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=keep)
        else:
            tl.store(base + cols, dz.to(z_ptr.dtype.element_ty), mask=keep)


# Measured on one H200 (bench/gpu_check.py's kernel sweep, [4096, 49152] bf16 logits): the forward at 2,048
# columns and 8 warps read 2.0 TB/s (4,096 / 8: 1.7 TB/s), the backward at 2,048 / 4 moved 3.3 TB/s.
FWD_WARPS, BWD_WARPS = 8, 4


def _block(v: int) -> int:
    return min(2048, triton.next_power_of_2(v))


def _check(z: torch.Tensor, targets: torch.Tensor) -> None:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits must be a row-major [rows, V] tensor, got shape {tuple(z.shape)}, "
                         f"strides {z.stride()}")
    if targets.shape != z.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [rows] with rows = {z.shape[0]}")


def lse_and_target(z: torch.Tensor, targets: torch.Tensor, block: int | None = None,
                   num_warps: int = FWD_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of each row, z[row, targets[row]]), both fp32 [rows]; z is read, not written."""
    _check(z, targets)
    n, v = z.shape
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    tlogit = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        _lse_rows[(n,)](z, z.stride(0), targets, lse, tlogit, v, BLOCK=block or _block(v), num_warps=num_warps)
    return lse, tlogit


def dlogits_inplace(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                    block: int | None = None, num_warps: int = BWD_WARPS) -> torch.Tensor:
    """Overwrite z with grad[:, None] * (onehot(targets) - softmax(z)), softmax taken as exp(z - lse); returns z."""
    _check(z, targets)
    n, v = z.shape
    if n:
        _dlogits_rows[(n,)](z, z.stride(0), targets, lse.float().contiguous(), grad.float().contiguous(), v,
                            BLOCK=block or _block(v), num_warps=num_warps)
    return z
