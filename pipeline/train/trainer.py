"""The training loop: read one table, cache reference log-probs, then optimise (nanoGPT-style, one sitting).

    output_dir/metrics.jsonl         one line per `metrics_every` steps, TRL's metric names
    output_dir/checkpoint-<step>/    every `save_every` steps (model.safetensors + tokenizer + trainer_state.json)
    output_dir/final/                the final model
    output_dir/train_summary.json    config, data/truncation counts, reference cache, final metrics, log-prob drift

Log-prob drift (`drift_probe`): the same first N groups of the data are scored by the policy before the first
step and after the last one, so the change is measured on fixed sequences (the per-step `logps/*` metrics are on
a different batch every step, so their first-to-last change mixes training with batch composition).

Per optimizer step: `grad_accum` micro-batches of `micro_batch` groups; each micro-batch is ONE forward over all
its sequences ([chosen ; rejected], or the K responses of each list). Every loss term is a sum over the global
batch divided by the global count (pairs, and chosen tokens for token-mean NLL), so 8 x 1 and 1 x 8 give the same
gradients.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.threads import set_threads
from pipeline.train import lean
from pipeline.train.config import TrainConfig
from pipeline.train.collate import Batch, collate
from pipeline.train.data import Encoded, encode_lists, encode_pairs, encode_sft, pad_id_of, read_table
from pipeline.train.forward import row_logps
from pipeline.train.heap import HeapTrimmer
from pipeline.train.losses import BATCH_COUPLED_TYPES, ListBatch, LossState, PairBatch, list_loss, pair_loss
from pipeline.train.losses.types import REFERENCE_FREE_TYPES
from pipeline.train.refcache import compute_ref_logps, reference_logps, state_dict_hash

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    ref_reused: bool | None = None
    ref_forwards: int = 0
    drift: dict | None = None


def sdpa_context(names: str | list[str] | None, device: torch.device):
    """The attention kernels SDPA may use inside the block (TrainConfig.sdpa_backends); None: no restriction."""
    if names == "auto":
        names = ["flash", "efficient", "math"] if device.type == "cuda" else None
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([table[n] for n in names])


class MetricSums:
    """A step's metrics summed over its micro-batches on the device, read back in one transfer at the end: a
    float() per metric per micro-batch would make the host wait for the GPU a dozen times a step."""

    def __init__(self):
        self.values: dict[str, torch.Tensor | float] = {}
        self.tokens = 0

    def add(self, loss: torch.Tensor, metrics: dict, share: float, tokens: int) -> None:
        """loss is already scaled to the global batch; metrics are means over the micro-batch (weight `share`)."""
        self.tokens += tokens
        items = [("loss", loss.detach(), 1.0)] + [(k, v, share) for k, v in metrics.items()]
        for k, v, w in items:
            v = v.detach().double() * w if isinstance(v, torch.Tensor) else float(v) * w
            self.values[k] = self.values[k] + v if k in self.values else v

    def result(self) -> dict:
        keys = [k for k, v in self.values.items() if isinstance(v, torch.Tensor)]
        out: dict = {k: v for k, v in self.values.items() if not isinstance(v, torch.Tensor)}
        if keys:
            flat = torch.stack([self.values[k].reshape(()).to(self.values[keys[0]].device) for k in keys]).tolist()
            out.update(zip(keys, flat))
        out.setdefault("loss", 0.0)
        out["num_tokens"] = self.tokens
        return out


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for plain fp32)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda asked for but no CUDA device is available", column="device")
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and dev.type == "cuda"):
        return dev, torch.bfloat16
    return dev, None


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay from lr down to
    lr * min_lr_ratio (0 by default), reached at step `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
    # With the default floor 0 this is exactly cfg.lr * decay (0 + 1.0 * x == x), the schedule of earlier runs.
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def load_model_and_tokenizer(cfg: TrainConfig, path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import resolve_model
    folder = resolve_model(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation=cfg.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    return model, tok, folder


def report_encoding(stats, tok_cfg, show: bool) -> None:
    """Rows that max_length dropped or cut, said on the terminal (they were only in train_summary.json)."""
    parts = [f"{n} {what}" for n, what in ((stats.rows_dropped, "rows dropped (prompt leaves no room)"),
                                           (stats.prompts_truncated, "prompts truncated"),
                                           (stats.completions_truncated, "completions truncated")) if n]
    if parts and show:
        print(f"data: {stats.rows_in} rows; " + ", ".join(parts) + f" at max_length={tok_cfg.max_length}"
              + (f", max_prompt_length={tok_cfg.max_prompt_length}" if tok_cfg.max_prompt_length else ""),
              file=sys.stderr)


def disable_dropout(model: torch.nn.Module) -> None:
    # As TRL does: dropout makes the policy's step-1 log-probs differ from the cached (eval-mode) reference.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class Trainer:
    """Holds the model, the encoded data and the cached reference log-probs; `train()` runs the loop.

    `model`/`tokenizer`/`ref_model` may be passed in (tests, notebooks); otherwise they load from cfg paths.
    """

    is_main = True  # the process that writes files (rank 0 under torchrun)

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, ref_model=None):
        self.cfg = cfg
        if cfg.threads:
            set_threads(cfg.threads)
        self.device, self.autocast = resolve_device(cfg)
        self.model_folder = None
        self.table = read_table(cfg.data)  # read and checked before the model loads: bad data fails in seconds
        if model is None:
            model, loaded_tok, self.model_folder = load_model_and_tokenizer(cfg, cfg.model)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("a tokenizer is needed when the model is passed in")
        self.model, self.tokenizer, self._ref_model = model, tokenizer, ref_model
        self.pad_id = pad_id_of(tokenizer)
        self.kind = self._data_kind()
        self.data = self._encode()
        report_encoding(self.data.stats, self.cfg.tokenize, self.is_main)
        self.ref: np.ndarray | None = None  # [groups, K] float64, NaN where a list has fewer responses
        self.ref_info: dict = {}
        self.loss_state = LossState()
        self.heap = HeapTrimmer(self.model, 0)  # inactive until setup(); see pipeline/train/heap.py

    # ------------------------------------------------------------------------------------------------ data
    def _data_kind(self) -> str:
        if self.cfg.mode == "sft":
            return "sft"
        if self.cfg.data_kind != "auto":
            return self.cfg.data_kind
        return "lists" if "responses" in self.table.column_names else "pairs"

    def _encode(self) -> Encoded:
        if self.kind == "pairs":
            data = encode_pairs(self.table, self.tokenizer, self.cfg.tokenize, file=self.cfg.data,
                                rationales=self.cfg.loss.rationale_gamma is not None)
        elif self.kind == "lists":
            data = encode_lists(self.table, self.tokenizer, self.cfg.tokenize, file=self.cfg.data)
        else:
            data = encode_sft(self.table, self.tokenizer, self.cfg.tokenize, file=self.cfg.data,
                              target=self.cfg.sft_column)
        if len(data) == 0:
            raise InputError(f"no row fits max_length={self.cfg.tokenize.max_length}", file=self.cfg.data)
        return data

    def needs_reference(self) -> bool:
        if self.kind == "sft":
            return False
        if self.kind == "lists":
            return not self.cfg.list_loss.reference_free and self.cfg.list_loss.loss_type != "pro"
        if self.cfg.pair_filter != "none":
            return True
        loss = self.cfg.loss
        return not loss.reference_free and any(t not in REFERENCE_FREE_TYPES for t in loss.loss_types)

    def _load_ref_model(self):
        if self._ref_model is not None:
            return self._ref_model.to(self.device)
        if self.cfg.ref_model is not None:
            ref, _, _ = load_model_and_tokenizer(self.cfg, self.cfg.ref_model)
            return ref.to(self.device)
        return self.model.to(self.device)  # the initial policy: called before any update

    def _ref_weights_id(self) -> str:
        from pipeline.models import resolve_model, weights_hash
        if self._ref_model is not None:
            return "sd:" + state_dict_hash(self._ref_model)
        if self.cfg.ref_model is not None:
            return "dir:" + weights_hash(resolve_model(self.cfg.ref_model))
        if self.model_folder is not None:
            return "dir:" + weights_hash(self.model_folder)
        return "sd:" + state_dict_hash(self.model)

    def prepare_reference(self) -> None:
        """The reference log-probs of the initial policy (or ref_model), once per Trainer: a second call (train()
        after an explicit prepare_reference()) keeps them, without hashing the weights or reading the cache again."""
        if not self.needs_reference():
            return
        if self.ref is not None:
            self.ref_info = {**self.ref_info, "reused": True, "forwards": 0}
            return
        with sdpa_context(self.cfg.sdpa_backends, self.device):
            self._prepare_reference()

    def _prepare_reference(self) -> None:
        cache_dir = self.cfg.ref_cache_dir or str(Path(self.cfg.data).resolve().parent / "refcache")
        kind = "pairs" if self.kind == "pairs" else "lists"
        res = reference_logps(self._load_ref_model, self._ref_weights_id(), self.tokenizer, self.cfg.tokenize,
                              self.table, self.data, kind, cache_dir, self.pad_id,
                              batch_groups=self.cfg.ref_batch_size, device=self.device,
                              autocast_dtype=self.autocast, chunk_tokens=self.cfg.head_chunk_tokens,
                              share_prompt=self.cfg.share_prompt, kernel=self.cfg.head_kernel)
        self.ref = _padded(res.per_group)
        self.ref_info = {"path": str(res.path), "reused": res.reused, "forwards": res.forwards}
        if self.cfg.pair_filter == "hard" and self.kind == "pairs":
            self._keep_hard_pairs()

    def _keep_hard_pairs(self) -> None:
        """Drop the pairs the reference already ranks right (the data and its cached reference columns alike)."""
        keep = np.flatnonzero(self.ref[:, 1] >= self.ref[:, 0]).tolist()
        self.ref_info["pair_filter"] = {"kind": "hard", "kept": len(keep), "of": len(self.data)}
        if not keep:
            raise InputError("pair_filter hard: the reference ranks every pair right, nothing left to train on",
                             file=self.cfg.data)
        log.info("pair_filter hard: %d of %d pairs kept", len(keep), len(self.data))
        self.data, self.ref = self.data.subset(keep), self.ref[keep]

    # ------------------------------------------------------------------------------------------------ loss
    def _group_tensor(self, batch: Batch, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values[batch.host_index()], dtype=torch.float32, device=self.device)

    def micro_loss(self, batch: Batch, n_items: int, n_tokens: float) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch, already scaled so that summing over the accumulation window gives the
        global-batch loss."""
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            out = self.logps(batch)
        pol, tok = batch.scatter(out.logps), batch.scatter(out.tokens.float())
        ref = self._group_tensor(batch, self.ref) if self.ref is not None else None
        if self.kind == "sft":
            loss = -pol[:, 0].sum() / n_tokens
            return loss, {"nll": loss.detach() * n_tokens / tok[:, 0].sum(),
                          "logps/chosen": pol[:, 0].detach().mean()}
        if self.kind == "pairs":
            pb = PairBatch(pol[:, 0], pol[:, 1], ref[:, 0] if ref is not None else None,
                           ref[:, 1] if ref is not None else None, tok[:, 0], tok[:, 1],
                           label_confidence=self._label_confidence(batch),
                           rationale_logps=pol[:, 2] if self.data.extra is not None else None)
            return pair_loss(pb, self.cfg.loss, self.loss_state, num_items_in_global_batch=n_items,
                             num_tokens_in_global_batch=n_tokens)
        scores = torch.zeros_like(pol)
        for b, gi in enumerate(batch.host_index().tolist()):
            s = self.data.scores[gi]
            scores[b, :len(s)] = torch.tensor(s, dtype=scores.dtype)
        lb = ListBatch(pol, torch.nan_to_num(ref) if ref is not None else None, tok.clamp(min=1), scores,
                       batch.slot_mask)
        loss, metrics = list_loss(lb, self.cfg.list_loss.labels_on(self.data.score_range))
        return loss * (batch.num_groups / n_items), metrics  # list_loss is a mean over this micro-batch

    def _label_confidence(self, batch: Batch) -> torch.Tensor | None:
        if not self.cfg.loss.use_label_confidence:
            return None
        if "label_confidence" not in self.table.column_names:
            raise InputError("loss.use_label_confidence needs this column", file=self.cfg.data,
                             column="label_confidence")
        col = self.table["label_confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
        # a missing confidence means an unsmoothed label (1.0), as with label_smoothing = 0
        return self._group_tensor(batch, np.nan_to_num(col[self.data.rows], nan=1.0))

    def probe_logps(self) -> np.ndarray | None:
        """[N, K] summed log-probs of the current policy on the first `drift_probe` groups (NaN: missing slot).
        Goes through `self.logps`, so under torchrun every rank runs the same forwards of the wrapped model."""
        n = min(self.cfg.drift_probe, len(self.data))
        if n == 0:
            return None
        per, _ = compute_ref_logps(self.model, self.data.subset(list(range(n))), self.pad_id,
                                   self.cfg.ref_batch_size, self.device, self.autocast,
                                   share_prompt=self.cfg.share_prompt, logps_fn=self.logps)
        return _padded(per)

    def drift(self, before: np.ndarray | None, after: np.ndarray | None) -> dict | None:
        """Mean per-slot change (nats per sequence) on the probe; slot names as the data kind has them."""
        if before is None or after is None:
            return None
        names = {"pairs": ["chosen", "rejected"], "sft": ["chosen"]}.get(self.kind)
        delta = after - before
        out = {"groups": int(delta.shape[0])}
        for k in range(delta.shape[1]):
            col = delta[:, k][~np.isnan(delta[:, k])]
            out[names[k] if names and k < len(names) else f"slot{k}"] = float(col.mean()) if col.size else None
        return out

    # ------------------------------------------------------------------------------------------------ loop
    def _schedule(self) -> list[list[int]]:
        """The global batches (lists of group indices) for the whole run."""
        per_step = self.cfg.micro_batch * self.cfg.grad_accum
        n = len(self.data)
        steps_per_epoch = math.ceil(n / per_step)
        total = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * steps_per_epoch))
        if self.cfg.length_bucketing:
            return self._bucketed_schedule(per_step, total)
        rng = np.random.default_rng(self.cfg.seed)
        batches: list[list[int]] = []
        while len(batches) < total:
            order = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
            batches += [order[s:s + per_step].tolist() for s in range(0, n, per_step)]
        return batches[:total]

    BUCKET_WINDOW = 50  # global batches whose groups are sorted by length together

    def _bucketed_schedule(self, per_step: int, total: int) -> list[list[int]]:
        """Per epoch: shuffle the groups, sort each window of BUCKET_WINDOW batches by sequence length (batches of
        similar lengths: less padding), cut into batches, shuffle the batches. Python's `random` seeded with
        cfg.seed and batches taken from the end of each epoch's list: the order the tiny policy was trained in."""
        rng = random.Random(self.cfg.seed)
        length = [len(p) + sum(map(len, cs)) for p, cs in zip(self.data.prompts, self.data.completions)]
        window = self.BUCKET_WINDOW * per_step
        batches: list[list[int]] = []
        while len(batches) < total:
            order = list(range(len(self.data)))
            rng.shuffle(order)
            epoch: list[list[int]] = []
            for i in range(0, len(order), window):
                chunk = sorted(order[i:i + window], key=length.__getitem__)  # stable: ties keep shuffled order
                epoch += [chunk[j:j + per_step] for j in range(0, len(chunk), per_step)]
            rng.shuffle(epoch)
            batches += epoch[::-1]
        return batches[:total]

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on norms and biases
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.adam_betas, eps=self.cfg.adam_eps,
                                 **adamw_impl(decay + no_decay))

    def accumulate(self, groups: list[int]) -> dict:
        """Forward + backward of one global batch, split into micro-batches; gradients add up in .grad."""
        n_items = len(groups)
        n_tokens = float(sum(len(self.data.completions[g][0]) for g in groups))
        sums = MetricSums()
        for s in range(0, n_items, self.cfg.micro_batch):
            self.heap()  # the previous step's freed gradients and activations go back to the OS
            micro = groups[s:s + self.cfg.micro_batch]
            batch = collate(self.data, micro, self.pad_id, self.cfg.share_prompt).to(self.device)
            loss, metrics = self.micro_loss(batch, n_items, n_tokens)
            loss.backward()
            sums.add(loss, metrics, share=len(micro) / n_items, tokens=batch.num_tokens())
        return sums.result()

    def step(self, groups: list[int], optimizer: torch.optim.Optimizer, lr: float) -> dict:
        """One optimizer step over `groups`. Returns the step's metrics (grad_norm before clipping)."""
        metrics = self.accumulate(groups)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = self.clip_grad_norm(params, max_norm)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.loss_state.on_optimizer_step()
        metrics.update({"grad_norm": float(grad_norm), "learning_rate": lr})
        return metrics

    def setup(self) -> None:
        """Reference log-probs first (the initial policy may be the reference), then the policy in train mode."""
        self.prepare_reference()
        self.model.to(self.device)
        self.model.train()
        disable_dropout(self.model)
        if self.cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Not under checkpointing: it keeps no layer's activations anyway, and there lean cost SmolLM2 7-8 % of
        # tokens/s for no lower peak (bench/trainer, docs/benchmarks.md). No-op for families it does not know.
        if (self.cfg.lean_activations and not self.cfg.gradient_checkpointing and self.autocast is None
                and self.cfg.distributed != "fsdp"):
            lean.apply(self.model)
        self.heap.remove()
        self.heap = HeapTrimmer(self.model, self.cfg.heap_trim_every if self.device.type == "cpu" else 0)
        self.heap()  # what the reference pass freed

    def train(self, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
        """Run the loop. `on_step(step, metrics)` is called after every optimizer step (1-based step, that step's
        metrics), on the main process only: periodic evaluations, checkpoints or logs of a caller (e.g.
        scripts/train_tiny_policy.py's greedy evals of the bundled task). It must leave the model as it found it
        (train mode, same weights)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with sdpa_context(cfg.sdpa_backends, self.device):
            return self._train(out, on_step)

    def _train(self, out: Path, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
        cfg = self.cfg
        self.setup()
        if self.kind == "pairs" and cfg.grad_accum > 1 and set(cfg.loss.loss_types) & BATCH_COUPLED_TYPES:
            log.warning("loss %s couples pairs within a batch: with grad_accum > 1 it sees micro-batches only",
                        cfg.loss.loss_types)
        schedule = self._schedule()
        self.loss_state.max_steps = len(schedule)
        optimizer = self._optimizer()
        result = TrainResult(steps=len(schedule), output_dir=out, ref_reused=self.ref_info.get("reused"),
                             ref_forwards=self.ref_info.get("forwards", 0))
        per_epoch = math.ceil(len(self.data) / (cfg.micro_batch * cfg.grad_accum))
        start = self.resume(optimizer)  # 0, or the step of the checkpoint in cfg.resume_from
        bar = _progress(f"train {out.name}", len(schedule) - start, cfg.progress and self.is_main)
        probe_before = self.probe_logps() if start == 0 else None  # a resumed run has no "before"
        with open(out / "metrics.jsonl", "a" if start else "w") if self.is_main else open(os.devnull, "w") \
                as metrics_file:
            for i, groups in enumerate(schedule):
                if i < start:
                    continue
                t0 = time.perf_counter()
                m = self.step(groups, optimizer, lr_at(i, cfg, len(schedule)))
                dt = time.perf_counter() - t0
                m = {"step": i + 1, "epoch": round((i + 1) / per_epoch, 4), **m,
                     "tokens/s": m["num_tokens"] / max(dt, 1e-9)}
                result.history.append(m)
                if (i + 1) % cfg.metrics_every == 0 or i + 1 == len(schedule):
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.update(1, loss=m["loss"], **({"acc": m["rewards/accuracies"]}
                                                      if "rewards/accuracies" in m else {}))
                if cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < len(schedule):
                    self.save(out / f"checkpoint-{i + 1}", self._state(i + 1, m), optimizer)
                if on_step is not None and self.is_main:
                    on_step(i + 1, m)
        drift = self.drift(probe_before, self.probe_logps() if probe_before is not None else None)
        result.drift = drift
        if cfg.save_final:
            self.save(out / "final", self._state(len(schedule), result.history[-1]))
        summary = {"config": cfg.model_dump(mode="json"), "kind": self.kind, "groups": len(self.data),
                   "encode": self.data.stats.as_dict(), "reference": self.ref_info, "steps": len(schedule),
                   "last": result.history[-1] if result.history else None, "drift": drift}
        if self.is_main:
            (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        return result

    # Hooks the data-parallel trainer (pipeline/distributed/ddp.py) overrides.
    def logps(self, batch: Batch):
        return row_logps(self.model, batch, chunk_tokens=self.cfg.head_chunk_tokens, kernel=self.cfg.head_kernel)

    def clip_grad_norm(self, params, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def save(self, folder: Path, state: dict, optimizer=None) -> None:
        """Model + tokenizer + state; with the optimizer, a checkpoint that `resume_from` continues."""
        from pipeline.distributed.checkpoint import save_training_checkpoint
        save_training_checkpoint(self, folder, state, optimizer)

    def resume(self, optimizer) -> int:
        if not self.cfg.resume_from:
            return 0
        from pipeline.distributed.checkpoint import load_training_checkpoint
        return load_training_checkpoint(self, self.cfg.resume_from, optimizer)

    def _state(self, step: int, last: dict) -> dict:
        return {"step": step, "config": self.cfg.model_dump(mode="json"), "last_metrics": last}


def adamw_impl(params: list[torch.Tensor]) -> dict:
    """AdamW's fused kernel where it applies (plain fp tensors on CPU or CUDA: one pass over each parameter, no
    per-parameter temporaries; on CPU ~5x faster than the per-tensor loop at SmolLM2's size, and what
    transformers' Trainer uses by default), else the foreach path. FSDP's sharded parameters are DTensor
    subclasses, so the exact-type test sends them to foreach."""
    if params and all(type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                      for p in params):
        return {"fused": True}
    return {"foreach": bool(params) and params[0].device.type == "cuda"}


def _padded(per_group: list[list[float]]) -> np.ndarray:
    """Per-group lists of log-probs -> [groups, K] float64, NaN where a group has fewer completions."""
    out = np.full((len(per_group), max(map(len, per_group))), np.nan)
    for i, g in enumerate(per_group):
        out[i, :len(g)] = g
    return out


def _progress(label: str, total: int, enabled: bool):
    """Lines with steps, loss and ETA (pipeline/progress.py): also readable when arms train side by side."""
    if not enabled or os.environ.get("PREFPIPE_NO_PROGRESS"):
        return None
    from pipeline.progress import ProgressLine
    return ProgressLine(label, total, "steps")
