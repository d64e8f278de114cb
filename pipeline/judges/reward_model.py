"""Reward-model scorer: a local `AutoModelForSequenceClassification` folder (Skywork-Reward / ArmoRM style) scores
(prompt, response) pairs with one scalar each (docs/reward-model.md).

Encoding (`encode`, shared with `prefpipe train --mode reward`, so a model is scored as it was trained): with a chat
template, [user: prompt, assistant: response] rendered by the tokenizer's template and tokenized without added
specials (a BOS is put in front only when the tokenizer adds one and the template did not write it); without
one, the prompt, a blank line and the response, tokenized with the tokenizer's own specials. The score is the
classification head's output at the last token that is not padding: the model class's own pooling, which needs
`config.pad_token_id` (the trainer sets it).

Step inputs (tree-search nodes): the response is the verified prefix plus the step, `score_steps(prompts,
prefixes, steps)`; the tree's prefix text already ends with the step join.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.errors import InputError


def render(tokenizer, prompt: str, response: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
    return f"{prompt}\n\n{response}"


def encode(tokenizer, prompt: str, response: str, max_length: int | None = None) -> list[int]:
    """Token ids of one scored sequence; over `max_length` it keeps its end (the response, where the score sits)."""
    text = render(tokenizer, prompt, response)
    if not getattr(tokenizer, "chat_template", None):
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        if bos is not None and probe and probe[0] == bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
    if max_length is not None and len(ids) > max_length:
        ids = ids[len(ids) - max_length:]
    return ids


def pad_batch(seqs: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def forward_scores(model, seqs: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """[len(seqs)] scores of one padded forward (gradients flow when the caller allows them)."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def pad_token_of(model) -> int:
    pad = model.config.get_text_config().pad_token_id
    if pad is None:
        raise InputError("the reward model's config has no pad_token_id (needed to find each row's last token)",
                         column="pad_token_id")
    return int(pad)


class RewardModelScorer:
    """Scores with a local sequence-classification folder, `batch_size` sequences per forward (sorted by length so
    padding stays small), on CPU or CUDA, in fp32 (bf16 on CUDA with dtype="bf16")."""

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 32, max_length: int | None = None,
                 dtype: str = "fp32", trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise InputError("not a model folder (no config.json)", file=str(folder))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_id = str(folder)
        self.device = torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
            trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise InputError(f"a reward model has one output, this one has {self.model.config.num_labels}",
                             file=str(folder), column="num_labels")
        self.pad_id = pad_token_of(self.model)

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[list[int]]) -> list[float]:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            for i, v in zip(idx, forward_scores(self.model, [seqs[i] for i in idx], self.pad_id).tolist()):
                out[i] = v
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)])

    def score_steps(self, prompts: Sequence[str], prefixes: Sequence[str], steps: Sequence[str]) -> list[float]:
        """A step given its verified prefix: the response scored is prefix + step."""
        return self.score(prompts, [p + s for p, s in zip(prefixes, steps)])


@functools.lru_cache(maxsize=4)
def load_scorer(path: str, device: str = "auto", batch_size: int = 32) -> RewardModelScorer:
    """One scorer per folder per process (tree search values every round with the same model)."""
    return RewardModelScorer(path, device=device, batch_size=batch_size)
