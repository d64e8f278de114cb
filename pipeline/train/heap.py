"""Hand freed host heap back to the OS at layer boundaries (CPU training; glibc only).

Why: torch's CPU tensors come from malloc. glibc serves every block under its (self-raising) mmap threshold
from the heap and keeps a freed block resident. A training step allocates and frees a layer's activations
(forward, the checkpointed recompute, backward) between the long-lived parameter gradients, and that leaves
hundreds of MB of free but resident heap. On SmolLM2-135M (bench/trainer shape) that fragmentation was
400-450 MB of a 3.1 GB peak.

`malloc_trim(0)` gives the free pages of every arena back to the OS (madvise). The cost is a page fault when
those pages are used again. The peak of a step is in the backward, when every parameter gradient is held, so the
trims are placed where the free heap is largest before it:
- the start of each micro-batch (the previous step's freed gradients);
- the end of the forward (the last layer's output; its activations are gone, the backward has not begun);
- the backward of every `every`-th decoder layer, layer 0 included (a gradient hook on the layer's output);
- just before the input embedding's backward.
Trims inside the forward were tried and lowered nothing: the forward's own peak is ~350 MB under the backward's.
bench/trainer measures the effect against TRL side by side (docs/benchmarks.md).

Each point trims only when at least MIN_FREE_BYTES of heap is free (mallinfo2). Models under MIN_PARAMS
parameters are not trimmed at all: their heap fragments by tens of MB, and the trims cost them more than that
is worth. Elsewhere (not glibc, or `every` = 0) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

log = logging.getLogger(__name__)
# A trim costs a walk of the heap plus a page fault for each freed page used again. Two gates keep that where it
# pays. A trim point trims only when at least MIN_FREE_BYTES of heap is free. Models under MIN_PARAMS parameters
# are not trimmed at all: the tiny policy (a few M parameters, 0.1-0.3 s steps, a heap of many small free blocks)
# lost 22-23 % of tokens/s to trimming, with or without the free-heap test, for 26-30 MB less; SmolLM2-135M lost
# 3-11 % for 430-490 MB less.
MIN_FREE_BYTES = 32 << 20
MIN_PARAMS = 50_000_000


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc_fn(name: str, argtypes: tuple, restype):
    """A libc function by name, or None where this libc has none (musl, macOS, Windows; mallinfo2 < glibc 2.33)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def _malloc_trim():
    return _libc_fn("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)


def free_heap_bytes() -> int | None:
    """Bytes in free heap blocks, all arenas (glibc mallinfo2), or None where it cannot be read."""
    fn = _libc_fn("mallinfo2", (), _Mallinfo2)
    return int(fn().fordblks) if fn is not None else None


def trim(min_free: int = 0) -> bool:
    """Return free heap pages to the OS now, if at least `min_free` bytes are free (always, where that cannot be
    read). True when a trim ran."""
    fn = _malloc_trim()
    if fn is None:
        return False
    if min_free > 0:
        free = free_heap_bytes()
        if free is not None and free < min_free:
            return False
    fn(0)
    return True


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer blocks: its longest ModuleList (None when it has none)."""
    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > (len(best) if best is not None else 0):
            best = m
    return best


class HeapTrimmer:
    """Installs the trims described in the module docstring on `model`; `remove()` takes them off."""

    def __init__(self, model: torch.nn.Module, every: int, min_free: int | None = None):
        self.min_free = MIN_FREE_BYTES if min_free is None else min_free
        self.calls = 0  # trims done (tests read it)
        self._handles: list = []
        usable = every > 0 and _malloc_trim() is not None
        self.every = every if usable and sum(p.numel() for p in model.parameters()) >= MIN_PARAMS else 0
        if not self.every:
            return
        layers = decoder_layers(model)
        if layers is None:
            log.info("heap trimming: no layer stack found; trimming at micro-batch starts only")
            return
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            if i % every == 0:  # layer 0 too: its backward is where every gradient is held
                self._handles.append(layer.register_forward_hook(self._grad_hook_on_output))
            if i == last:
                self._handles.append(layer.register_forward_hook(self._post))
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:
            self._handles.append(emb.register_forward_hook(self._grad_hook_on_output))

    @property
    def active(self) -> bool:
        return self.every > 0  # 0 where off, unavailable or gated out

    def __call__(self) -> None:
        if self.active and trim(self.min_free):
            self.calls += 1

    def _post(self, module, args, output):
        self()

    def _grad_hook_on_output(self, module, args, output):
        t = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(self._on_grad)

    def _on_grad(self, grad):
        self()
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
