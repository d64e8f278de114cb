"""Supervised fine-tuning on the bundled task's gold solutions: the loop that trains the tiny policy.

Plain PyTorch: length-bucketed padded batches, loss only on the assistant's tokens (solution + EOS), AdamW,
linear warmup then cosine decay, and greedy accuracy on eval problems every `eval_every` steps.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import BaseModel, Field

from pipeline.evaluate import wilson_interval
from pipeline.tasks.arith import Problem
from pipeline.tasks.verify import first_wrong_step, verify_answer


class SFTConfig(BaseModel):
    """Optimisation settings. Defaults are the tiny policy's (data/tiny-policy/train_config.yaml)."""

    steps: int = Field(3000, description="optimizer steps")
    batch_size: int = Field(32, description="sequences per step")
    lr: float = Field(2e-3, description="peak learning rate")
    min_lr_ratio: float = Field(0.05, description="cosine decays to lr * this")
    warmup_steps: int = Field(100, description="linear warmup steps")
    weight_decay: float = Field(0.1, description="AdamW decay on matrices (not on norms)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, description="max global grad norm")
    eval_every: int = Field(250, description="greedy eval every this many steps (0 = never)")
    eval_n: int = Field(200, description="eval problems used during training")
    log_every: int = Field(50, description="print the mean train loss every this many steps")
    seed: int = Field(0, description="data order and init seed")
    time_budget_s: float | None = Field(None, description="stop after this much wall time; the cosine schedule "
                                        "then runs on elapsed time so it still ends annealed")


@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # positions before the assistant's first token: excluded from the loss


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                        add_generation_prompt=True)


def encode_example(tokenizer, p: Problem) -> Example:
    # The template text of (user, assistant) is the generation prompt + solution + EOS; encoding the two parts
    # separately gives the same ids for a char-level tokenizer and tells where the loss starts.
    prompt = tokenizer(chat_prompt(tokenizer, p.question), add_special_tokens=False).input_ids
    answer = tokenizer(p.gold_solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return Example(prompt + answer, len(prompt))


def bucketed_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, sort within windows of 50 batches by length (less padding), then shuffle the batches."""
    order = examples[:]
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda e: len(e.ids))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, labels = -100 on prompt and padding."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, e in enumerate(batch):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        mask[r, :n] = 1
        labels[r, e.n_prompt:n] = ids[r, e.n_prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(step: int, cfg: SFTConfig, time_frac: float = 0.0) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine down to min_lr_ratio at the last step, or at the
    end of the time budget (`time_frac` = elapsed / budget) if that comes first."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), time_frac)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norm gains
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def greedy_generate(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 128) -> list[str]:
    """Greedy completions (text after the generation prompt, up to EOS), batched with left padding."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths -> little padding
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(idx, gen[:, enc.input_ids.shape[1]:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return out


def max_new_tokens_for(problems: list[Problem]) -> int:
    """Room for the gold solution's length plus slack for a model that writes longer numbers."""
    return max(len(p.gold_solution) for p in problems) + 24


def greedy_accuracy(model, tokenizer, problems: list[Problem], batch_size: int = 128) -> dict:
    """Final-answer accuracy (with its 95 % interval) and all-steps-right rate of greedy decoding."""
    texts = greedy_generate(model, tokenizer, [p.question for p in problems], max_new_tokens_for(problems),
                            batch_size)
    k = sum(verify_answer(t, p) for t, p in zip(texts, problems))
    k_steps = sum(first_wrong_step(t, p) is None for t, p in zip(texts, problems))
    lo, hi = wilson_interval(k, len(problems))
    return {"n": len(problems), "correct": k, "accuracy": k / max(1, len(problems)), "ci95": [lo, hi],
            "steps_all_right": k_steps / max(1, len(problems)), "texts": texts}


def train_sft(model, tokenizer, train: list[Problem], eval_problems: list[Problem], cfg: SFTConfig,
              log: Callable[[str], None] = print, on_eval: Callable[[int], None] | None = None) -> list[dict]:
    """Train `model` in place; returns the history of logged losses and evals. `on_eval(step)` runs after each
    eval (e.g. to save a checkpoint)."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    examples = [encode_example(tokenizer, p) for p in train]
    opt = make_optimizer(model, cfg)
    t0 = time.time()

    def time_frac() -> float:
        return (time.time() - t0) / cfg.time_budget_s if cfg.time_budget_s else 0.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg, time_frac()))
    history: list[dict] = []
    batches: list[list[Example]] = []
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        if not batches:
            batches = bucketed_batches(examples, cfg.batch_size, rng)
        batch = collate(batches.pop(), tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step + 1
        out_of_time = time_frac() >= 1.0
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, "loss": sum(losses) / len(losses), "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(time.time() - t0, 1)}
            history.append(rec)
            log(f"step {done} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['elapsed_s']}s")
            losses = []
        if cfg.eval_every and eval_problems and (done % cfg.eval_every == 0 or done == cfg.steps or out_of_time):
            ev = greedy_accuracy(model, tokenizer, eval_problems[:cfg.eval_n])
            history.append({"step": done, "eval_accuracy": ev["accuracy"], "eval_steps_all_right":
                            ev["steps_all_right"], "elapsed_s": round(time.time() - t0, 1)})
            log(f"step {done} eval acc {ev['accuracy']:.3f} steps-right {ev['steps_all_right']:.3f} "
                f"e.g. {ev['texts'][0]!r}")
            if on_eval is not None:
                on_eval(done)
        if out_of_time:
            log(f"time budget {cfg.time_budget_s}s reached at step {done}")
            break
    return history
