"""`prefpipe train --mode reward`: a reward model (verifier) trained on pair tables (docs/reward-model.md).

The model is the policy's architecture with a scalar head (`AutoModelForSequenceClassification`, num_labels 1, the
policy's body weights, a fresh head), saved as a folder that `transformers` loads and
pipeline/judges/reward_model.py scores; sequences are encoded by that scorer's `encode`, so a saved model scores
as it was trained. Every pair row counts: tree step pairs (prompt, prefix + right step, prefix + wrong step) and
final-answer pairs alike.

Objectives (`reward.objective`):
- pairwise: Bradley-Terry, -log sigmoid(r(x, chosen) - r(x, rejected)), mean over pairs;
- step_ranking: Tree-PLV's step-level form, -sum_{i=d..n} log sigmoid(r(x, chosen_{1:i}) - r(x, rejected_{1:i}))
  over the steps from the first one where the sides differ (d) to the end (a shorter side stays at its full
  text); for a one-step pair it equals pairwise.

Held-out split: `reward.eval_data`, else `reward.eval_fraction` of the prompts (whole prompts, so no prompt is on
both sides). Every `reward.eval_every` steps and at the end: pairwise accuracy (r(chosen) > r(rejected)) and
mean margin on it, per pair_type too, printed and written to metrics.jsonl and train_summary.json.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from pipeline.errors import InputError
from pipeline.judges.reward_model import encode, forward_scores
from pipeline.threads import set_threads
from pipeline.train.data import check_pairs, pad_id_of, read_table
from pipeline.train.reward_config import RewardConfig
from pipeline.train.trainer import Trainer, TrainResult, _progress, lr_at, resolve_device

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig


@dataclass
class RewardPairs:
    """Encoded pairs: `comparisons[i]` is pair i's list of (chosen ids, rejected ids) the objective compares."""
    prompt_ids: list[str]
    pair_types: list[str | None]
    full: list[tuple[list[int], list[int]]]
    comparisons: list[list[tuple[list[int], list[int]]]]

    def __len__(self) -> int:
        return len(self.full)


def step_prefixes(chosen: str, rejected: str, sep: str) -> list[tuple[str, str]]:
    """Tree-PLV's comparisons: (chosen_{1:i}, rejected_{1:i}) for i from the first differing step to the end."""
    c, r = chosen.split(sep), rejected.split(sep)
    d = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
    return [(sep.join(c[:min(i, len(c))]), sep.join(r[:min(i, len(r))]))
            for i in range(d + 1, max(len(c), len(r)) + 1)]


def _column(table: pa.Table, name: str, default) -> list:
    return table[name].to_pylist() if name in table.column_names else [default] * table.num_rows


def encode_reward_pairs(table: pa.Table, tokenizer, cfg: RewardConfig, max_length: int) -> RewardPairs:
    prompts, chosen, rejected = (table[c].to_pylist() for c in ("prompt", "chosen", "rejected"))
    cache: dict[tuple[str, str], list[int]] = {}

    def ids(p: str, r: str) -> list[int]:
        if (p, r) not in cache:
            cache[(p, r)] = encode(tokenizer, p, r, max_length)
        return cache[(p, r)]

    full, comps = [], []
    for p, c, r in zip(prompts, chosen, rejected):
        full.append((ids(p, c), ids(p, r)))
        sides = step_prefixes(c, r, cfg.step_separator) if cfg.objective == "step_ranking" else [(c, r)]
        comps.append([(ids(p, a), ids(p, b)) for a, b in sides] or [(ids(p, c), ids(p, r))])
    pids = _column(table, "prompt_id", None)
    return RewardPairs([pid if pid is not None else p for pid, p in zip(pids, prompts)],
                       _column(table, "pair_type", None), full, comps)


def read_pairs(path: str, cfg: RewardConfig) -> pa.Table:
    table = read_table(path)
    check_pairs(table, path)
    if cfg.pair_types is not None:
        if "pair_type" not in table.column_names:
            raise InputError("reward.pair_types needs this column", file=path, column="pair_type")
        table = table.filter(pc.is_in(table["pair_type"], pa.array(cfg.pair_types)))
        if table.num_rows == 0:
            raise InputError(f"no row has a pair_type in {cfg.pair_types}", file=path, column="pair_type")
    return table


def split_prompts(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table | None]:
    """(train, held-out): a seeded `fraction` of the distinct prompts goes to the held-out side."""
    if fraction == 0:
        return table, None
    keys = _column(table, "prompt_id", None)
    keys = [k if k is not None else p for k, p in zip(keys, table["prompt"].to_pylist())]
    distinct = sorted(set(keys))
    n_eval = max(1, round(fraction * len(distinct)))
    if n_eval >= len(distinct):
        raise InputError(f"{len(distinct)} prompts cannot be split with eval_fraction {fraction}: give "
                         "reward.eval_data or more data", column="reward.eval_fraction")
    held = set(np.random.default_rng(seed).permutation(distinct)[:n_eval].tolist())
    mask = pa.array([k in held for k in keys])
    return table.filter(pc.invert(mask)), table.filter(mask)


def pair_metrics(rc: np.ndarray, rr: np.ndarray, types: list[str | None]) -> dict:
    """Pairwise accuracy (a tie counts wrong) and mean margin, overall and per pair_type."""
    out = {"pairs": int(rc.size), "accuracy": float(np.mean(rc > rr)), "margin": float(np.mean(rc - rr))}
    kinds = sorted({t for t in types if t is not None})
    if len(kinds) > 1:
        t = np.array(types, dtype=object)
        out["by_pair_type"] = {k: {"pairs": int((t == k).sum()), "accuracy": float(np.mean((rc > rr)[t == k]))}
                               for k in kinds}
    return out


class RewardTrainer:
    """Reads the pair tables (before any model loads), builds the scalar-head model, trains, evaluates, saves."""

    def __init__(self, cfg: "TrainConfig", model=None, tokenizer=None):
        self.cfg, self.rcfg = cfg, cfg.reward
        if cfg.threads:
            set_threads(cfg.threads)
        self.device, self.autocast = resolve_device(cfg)
        train_table = read_pairs(cfg.data, self.rcfg)
        if self.rcfg.eval_data is not None:
            self.train_table, self.eval_table = train_table, read_pairs(self.rcfg.eval_data, self.rcfg)
        else:
            self.train_table, self.eval_table = split_prompts(train_table, self.rcfg.eval_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)  # the fresh head's initialisation
        if model is None:
            model, tokenizer = load_reward_model(cfg)
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = pad_id_of(tokenizer)
        self.model.config.pad_token_id = self.pad_id  # the class's pooling finds each row's last token by it
        max_len = cfg.tokenize.max_length
        self.data = encode_reward_pairs(self.train_table, tokenizer, self.rcfg, max_len)
        self.eval = encode_reward_pairs(self.eval_table, tokenizer, self.rcfg, max_len) \
            if self.eval_table is not None else None

    def scores(self, seqs: list[list[int]]) -> np.ndarray:
        """Scores of the current model, no gradients, `eval_batch` sequences per forward (sorted by length)."""
        was = self.model.training
        self.model.eval()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = np.zeros(len(seqs))
        with torch.no_grad(), self._autocast():
            for s in range(0, len(order), self.rcfg.eval_batch):
                idx = order[s:s + self.rcfg.eval_batch]
                out[idx] = forward_scores(self.model, [seqs[i] for i in idx], self.pad_id).cpu().numpy()
        self.model.train(was)
        return out

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The in-memory model's scores, encoded as the saved folder's scorer encodes them."""
        return self.scores([encode(self.tokenizer, p, r, self.cfg.tokenize.max_length)
                            for p, r in zip(prompts, responses)]).tolist()

    def evaluate(self, pairs: RewardPairs) -> dict:
        flat = [s for c, r in pairs.full for s in (c, r)]
        sc = self.scores(flat)
        return pair_metrics(sc[0::2], sc[1::2], pairs.pair_types)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                              enabled=self.autocast is not None)

    def micro_loss(self, groups: list[int], n_items: int) -> tuple[torch.Tensor, dict]:
        """Summed objective of these pairs / n_items (the global batch), and the batch's pairwise accuracy."""
        seqs, owners = [], []
        for g in groups:
            for c, r in self.data.comparisons[g]:
                seqs += [c, r]
                owners.append(g)
        with self._autocast():
            s = forward_scores(self.model, seqs, self.pad_id)
        diff = s[0::2] - s[1::2]
        loss = -F.logsigmoid(diff).sum() / n_items
        last = [i for i, g in enumerate(owners) if i + 1 == len(owners) or owners[i + 1] != g]  # the full texts
        full = diff.detach()[last]
        return loss, {"accuracy": float((full > 0).float().sum()), "margin": float(full.sum())}

    # The preference trainer's batches (seeded shuffles, max_steps or epochs) and AdamW (no decay on norms): both
    # read only cfg, len(data) and the model's parameters.
    _schedule = Trainer._schedule
    _optimizer = Trainer._optimizer

    def train(self) -> TrainResult:
        cfg = self.cfg
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.to(self.device).train()
        schedule = self._schedule()
        opt = self._optimizer()
        result = TrainResult(steps=len(schedule), output_dir=out)
        evals: list[dict] = []
        bar = _progress(f"reward {out.name}", len(schedule), cfg.progress)
        with open(out / "metrics.jsonl", "w") as metrics_file:
            for i, groups in enumerate(schedule):
                t0 = time.perf_counter()
                m = self.step(groups, opt, lr_at(i, cfg, len(schedule)))
                m = {"step": i + 1, **m, "seconds": time.perf_counter() - t0}
                if self.eval is not None and ((i + 1) % self.rcfg.eval_every == 0 or i + 1 == len(schedule)):
                    ev = {"step": i + 1, **self.evaluate(self.eval)}
                    evals.append(ev)
                    m.update({"eval/accuracy": ev["accuracy"], "eval/margin": ev["margin"]})
                    if cfg.progress:
                        print(f"reward {out.name}: step {i + 1} held-out pairwise accuracy {ev['accuracy']:.4f}, "
                              f"margin {ev['margin']:.4f} ({ev['pairs']} pairs)", file=sys.stderr, flush=True)
                result.history.append(m)
                if (i + 1) % cfg.metrics_every == 0 or i + 1 == len(schedule):
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.update(1, loss=m["loss"], acc=m["accuracy"])
        if cfg.save_final:
            self.save(out / "final")
        summary = {"config": cfg.model_dump(mode="json"), "kind": "reward", "train_pairs": len(self.data),
                   "eval_pairs": len(self.eval) if self.eval is not None else 0, "steps": len(schedule),
                   "last": result.history[-1] if result.history else None, "evals": evals,
                   "final_eval": evals[-1] if evals else None}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        return result

    def step(self, groups: list[int], opt: torch.optim.Optimizer, lr: float) -> dict:
        n = len(groups)
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for s in range(0, n, self.cfg.micro_batch):
            loss, m = self.micro_loss(groups[s:s + self.cfg.micro_batch], n)
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["accuracy"] += m["accuracy"] / n
            sums["margin"] += m["margin"] / n
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters()
                                                          if p.grad is not None], max_norm))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {**sums, "grad_norm": grad_norm, "learning_rate": lr}

    def save(self, folder: Path) -> None:
        """An AutoModelForSequenceClassification folder (config with pad_token_id) plus the tokenizer."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def load_reward_model(cfg: "TrainConfig"):
    """The policy folder's architecture with a fresh one-output head (its ForSequenceClassification class)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.models import resolve_model
    folder = resolve_model(cfg.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    return model, tok

