"""Greedy accuracy of an in-memory causal LM on the bundled task's problems: the periodic evals of an SFT run
(scripts/train_tiny_policy.py calls `greedy_accuracy` from the Trainer's `on_step` hook) and the tiny
policy's test. Training itself is the Trainer's `mode: sft` (pipeline/train/trainer.py, docs/trainer.md).

It decodes with `model.generate` on the model object the Trainer is updating, so no checkpoint has to be written
and reloaded for each eval; `prefpipe eval` (pipeline/evaluate.py) is the equivalent for a saved model folder.
"""
from __future__ import annotations

import torch

from pipeline.evaluate import wilson_interval
from pipeline.tasks.arith import Problem
from pipeline.tasks.verify import first_wrong_step, verify_answer


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                        add_generation_prompt=True)


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
