"""The trainer under torchrun: DDP or FSDP2, each rank computing its slice of the same global batch.

    torchrun --nproc_per_node 8 -m flows.app train config.yaml          # distributed: auto -> DDP
    (distributed: fsdp in the YAML shards parameters, grads and optimizer state with FSDP2's fully_shard)

The global batch stays `micro_batch x grad_accum` whatever the world size: the step's micro-batches are cut
exactly as in one process and dealt out in contiguous blocks, one block per rank. Each loss term is already a
sum over the global batch divided by global counts, so the gradient all-reduce must *sum* the ranks'
contributions; DDP and FSDP2 average, hence the backward of `loss x world_size`. A rank whose block is shorter
runs a zero-weighted forward/backward so every rank issues the same collectives. Hence N processes follow the
single-process trajectory up to summation order.

Limits: losses that couple pairs inside a batch or keep running statistics (see BATCH_COUPLED_TYPES, BCO's
running mean, SPA's margin window) see the rank's own micro-batches, as they already do with grad_accum > 1.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket

import torch
import torch.distributed as dist

from pipeline.train.collate import collate
from pipeline.train.forward import row_logps
from pipeline.train.trainer import MetricSums, Trainer

log = logging.getLogger(__name__)


def distributed_mode(cfg) -> str:
    """none | ddp | fsdp; 'auto' means DDP when launched with WORLD_SIZE > 1 (torchrun), else none."""
    mode = getattr(cfg, "distributed", "none")
    if mode == "auto":
        return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    return mode


def coupling_note(cfg, world: int) -> str | None:
    """What the module docstring's limit means for this config: the loss terms that see each rank's own
    micro-batches instead of the whole batch (None when nothing is coupled or there is one rank)."""
    coupled = cfg.loss.batch_coupled() if world > 1 else []
    if not coupled:
        return None
    return (f"{', '.join(coupled)} couple(s) the pairs of a batch: with {world} ranks each computes it on its own "
            f"micro-batches, so the run is not the single-process trajectory")


def init_process_group(device: torch.device) -> tuple[int, int, int]:
    """(rank, world size, local rank), from torchrun's environment; one process when launched without it."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`: a group of one, so the same code path runs
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


class LogpModule(torch.nn.Module):
    """The forward DDP/FSDP2 wrap: per-sequence completion log-probs of a collated batch.

    `row_logps` calls the transformer body and reads the head weight directly (fused chunked head), so the
    wrapper's forward is what triggers DDP's gradient hooks and FSDP2's all-gather of the root parameters.
    """

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int, kernel: str = "auto"):
        super().__init__()
        self.lm, self.chunk_tokens, self.kernel = lm, chunk_tokens, kernel

    def forward(self, batch):
        return row_logps(self.lm, batch, chunk_tokens=self.chunk_tokens, kernel=self.kernel)


def _block_classes(model: torch.nn.Module) -> set[str]:
    """Transformer block class names (HF lists them as the modules never split across devices)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise TypeError(f"{type(model).__name__} names no transformer blocks (_no_split_modules) to shard")
    return names


def wrap(mode: str, model: torch.nn.Module, chunk_tokens: int, device: torch.device,
         kernel: str = "auto") -> torch.nn.Module:
    """DDP or FSDP2 around a LogpModule of `model` (in place for FSDP2: the model's parameters become shards)."""
    module = LogpModule(model, chunk_tokens, kernel)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # No buffer broadcast: the only buffers are rotary tables, equal on every rank.
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        blocks = _block_classes(model)
        for sub in model.modules():
            if type(sub).__name__ in blocks:
                fully_shard(sub, mesh=mesh)
        fully_shard(module, mesh=mesh)  # the root: embeddings, final norm and the head
        return module
    raise ValueError(f"unknown distributed mode {mode!r}")


@contextlib.contextmanager
def _rank0_first(rank: int):
    """Rank 0 runs the block first (e.g. writes the reference cache), then the others (they read it)."""
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0:
        dist.barrier()


class DistributedTrainer(Trainer):
    """`Trainer` whose steps are split over the ranks of a torchrun job (pipeline/train/launch.make_trainer builds
    it)."""

    def __init__(self, cfg, model=None, tokenizer=None, ref_model=None):
        super().__init__(cfg, model=model, tokenizer=tokenizer, ref_model=ref_model)
        self.mode = distributed_mode(cfg)
        if self.mode == "none":
            self.mode = "ddp"  # built directly: a group of one
        self.rank, self.world, local_rank = init_process_group(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.wrapped: torch.nn.Module | None = None
        if cfg.grad_accum % self.world:
            log.warning("grad_accum %d is not a multiple of the world size %d: some ranks idle on part of each "
                        "step", cfg.grad_accum, self.world)
        if note := coupling_note(cfg, self.world):
            log.warning(note)

    def setup(self) -> None:
        with _rank0_first(self.rank):
            super().setup()
        self.wrapped = wrap(self.mode, self.model, self.cfg.head_chunk_tokens, self.device, self.cfg.head_kernel)

    def logps(self, batch):
        return self.wrapped(batch) if self.wrapped is not None else super().logps(batch)

    def _sync_grads(self, sync: bool):
        """Accumulate locally on all but a rank's last micro-batch, then reduce once."""
        if self.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.wrapped.no_sync()

    def accumulate(self, groups: list[int]) -> dict:
        n_items = len(groups)
        n_tokens = float(sum(len(self.data.completions[g][0]) for g in groups))
        mb = self.cfg.micro_batch
        micros = [groups[s:s + mb] for s in range(0, n_items, mb)]
        rounds = math.ceil(len(micros) / self.world)
        mine = micros[self.rank * rounds:(self.rank + 1) * rounds]
        sums = MetricSums()
        for r in range(rounds):
            self.heap()
            micro = mine[r] if r < len(mine) else micros[0]
            batch = collate(self.data, micro, self.pad_id, self.cfg.share_prompt).to(self.device)
            with self._sync_grads(r == rounds - 1):
                if r >= len(mine):  # nothing left here: same collectives, zero gradient, no loss-state update
                    (self.logps(batch).logps.sum() * 0.0).backward()
                    continue
                loss, metrics = self.micro_loss(batch, n_items, n_tokens)
                (loss * self.world).backward()
            sums.add(loss, metrics, share=len(micro) / n_items, tokens=batch.num_tokens())
        return self._sum_over_ranks(sums.result())

    def _sum_over_ranks(self, sums: dict) -> dict:
        every: list = [None] * self.world
        dist.all_gather_object(every, sums)  # small dicts of floats; keys may differ on an idle rank
        total: dict[str, float] = {}
        for part in every:
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return total

    def clip_grad_norm(self, params, max_norm: float) -> float:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP2: a partial norm per shard
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)


def close() -> None:
    """End a torchrun job's process group: every rank meets at a barrier first, so no rank tears its gloo
    sockets down while a peer is still writing (a rank that exits first can abort the other at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
