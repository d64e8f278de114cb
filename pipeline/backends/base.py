"""The Backend protocol every stage calls, its sampling parameters and result types.

A prompt is either a chat (`Messages`: a list of {"role", "content"} dicts) or a plain string, which means one
user turn. All primitives are batched: one call takes every prompt of a batch and returns one entry per prompt.
"""
from __future__ import annotations

from typing import Literal, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

Message = dict[str, str]
Messages = list[Message]
Prompt = Union[Messages, str]
FinishReason = Literal["stop", "length", "eos"]


class SamplingParams(BaseModel):
    """How to sample. The defaults are plain ancestral sampling with 256 new tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, description="0 means greedy (argmax) decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass; 1.0 keeps every token.")
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 turns it off.")
    max_tokens: int = Field(256, ge=1, description="Most new tokens per sample.")
    stop: list[str] = Field(default_factory=list, description="Cut the text at the first of these strings.")
    include_stop: bool = Field(False, description="Keep the matched stop string at the end of the text.")
    seed: int | None = Field(None, description="Same seed and same call -> same samples. None: fresh randomness.")
    n: int = Field(1, ge=1, description="Samples per prompt (a call's `n=` argument overrides it).")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0


class Completion(BaseModel):
    """One sample. `token_ids` are the generated ids (an EOS that ended the sample is included, as vLLM does);
    `text` is their decoding without special tokens, cut at the stop string."""

    text: str
    token_ids: list[int] = Field(default_factory=list)
    n_tokens: int = 0
    finish_reason: FinishReason
    stop_str: str | None = Field(None, description="The stop string that ended the sample, if one did.")


class LogprobResult(BaseModel):
    """Teacher-forced log-probabilities of a completion after its chat-templated prompt (natural log)."""

    total: float
    per_token: list[float]
    token_ids: list[int]


@runtime_checkable
class Backend(Protocol):
    """What every model backend provides. Implementations: transformers, vllm, http."""

    model_id: str
    weights_hash: str

    def generate(self, prompts: list[Prompt], sampling: SamplingParams | None = None,
                 n: int | None = None) -> list[list[Completion]]:
        """Sample `n` (default `sampling.n`) completions of the assistant turn for each prompt."""
        ...

    def continue_(self, prompts: list[Prompt], assistant_prefixes: list[str],
                  sampling: SamplingParams | None = None, n: int | None = None) -> list[list[Completion]]:
        """Continue a partial assistant turn: the chat template with the generation prompt, then the prefix
        verbatim. The returned text is only the continuation (the prefix is not repeated)."""
        ...

    def logprobs(self, prompts: list[Prompt], completions: list[str]) -> list[LogprobResult]:
        """Score each completion after its chat-templated prompt (no sampling, one forward)."""
        ...

    def close(self) -> None:
        ...


def as_messages(prompt: Prompt) -> Messages:
    """A plain string is one user turn; a chat is checked for the role/content shape."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                               for m in prompt):
        raise TypeError(f"a prompt is a string or a list of {{'role','content'}} dicts, got {prompt!r:.200}")
    return prompt


def resolve_n(sampling: SamplingParams, n: int | None) -> int:
    if n is None:
        return sampling.n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return n


def cut_at_stop(text: str, stop: list[str], include_stop: bool) -> tuple[str, str | None]:
    """Cut `text` at the earliest stop string. Returns (text, the stop string found or None)."""
    best = -1
    best_len = 0
    for s in stop:
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best, best_len = i, len(s)
    if best == -1:
        return text, None
    hit = text[best:best + best_len]
    return text[: best + best_len] if include_stop else text[:best], hit
