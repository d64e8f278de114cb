"""A stage's judge, as configured in YAML (`judge:` of a stage), and how a stage opens it.

    judge:
      model: smollm2-135m      # omitted: the stage's own backend judges
      backend: http
      base_url: http://127.0.0.1:8000/v1
      mode: votes              # auto | votes | logprobs
      votes: 5

A judge that cannot work is refused when the config loads: mode `logprobs` on an http model with no local
tokenizer (a chat-only API gives no log-probs), several greedy votes (they would all be the same answer).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import InputError
from pipeline.judges.ask import supports_logprobs
from pipeline.judges.judge import Judge
from pipeline.judges.templates import JudgeTemplates

BUILT_IN_MODELS = ("tiny-policy", "smollm2-135m")
OWN_MODEL = "the stage's own model"  # how the run report names a judge that is the stage's own backend


def judge_label(model: str | None, backend: str = "transformers", mode: str = "auto",
                fallback: str = OWN_MODEL) -> str:
    """How the run report names a judge: `model (backend, mode)`, or `fallback` when no model of its own is set."""
    return fallback if not model else f"{model} ({backend}, {mode})"


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="judge model (built-in name or folder; for http the served "
                                                "name); None: the stage's own backend judges")
    backend: Literal["transformers", "vllm", "http"] = Field("transformers", description="backend of `model`")
    base_url: str | None = Field(None, description="server URL (http)")
    tokenizer: str | None = Field(None, description="http: local tokenizer, which gives log-probs; None: the "
                                                    "model's own folder when it is local, else chat-only")
    mode: Literal["auto", "votes", "logprobs"] = Field(
        "auto", description="votes: parse n sampled answers; logprobs: P of the answer tokens; auto: logprobs "
                            "when the backend scores text, else votes")
    votes: int = Field(1, ge=1, description="answers sampled per question in votes mode")
    temperature: float | None = Field(None, ge=0.0, description="votes' temperature; None: 0 for one vote, 1 "
                                                                "for several")
    max_tokens: int = Field(16, ge=1, description="most tokens of one answer (votes)")
    seed: int = Field(0, description="seed of the sampled votes")
    templates: JudgeTemplates = Field(default_factory=JudgeTemplates)

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        if self.votes > 1 and self.temperature == 0.0:
            raise ValueError(f"{self.votes} greedy votes are {self.votes} copies of one answer: set a temperature "
                             "above 0 or votes: 1")
        if self.mode == "logprobs" and self.model is not None and not self.scores_text:
            raise ValueError(f"judge mode 'logprobs' needs log-probs, and {self.model!r} on the http backend has "
                             "no local tokenizer (a chat-only API): use mode 'votes' or give `tokenizer`")
        return self

    def label(self, fallback: str = OWN_MODEL) -> str:
        return judge_label(self.model, self.backend, self.mode, fallback)

    @property
    def scores_text(self) -> bool:
        """Whether the configured judge model can give log-probs (without loading it)."""
        return self.backend != "http" or http_scores_text(str(self.model), self.tokenizer)


def http_scores_text(model: str, tokenizer: str | None = None) -> bool:
    """Whether an http model gives log-probs, known without loading anything: the http backend gets a local
    tokenizer (and so log-probs) when `tokenizer` or the model is a built-in name or a local model folder; a
    model known only by its served name (a hosted API) is chat-only."""
    name = tokenizer or model
    return name in BUILT_IN_MODELS or (Path(str(name)).expanduser() / "config.json").is_file()


def check_stage_logprobs(stage: str, cfg, backend: str, model: str, *, file: str | None = None,
                         column: str = "backend") -> None:
    """Refuse at config load a stage that needs log-probs (`cfg.logprobs_needed()`) on a chat-only http model,
    before any model loads. `@arm` models are trained folders of the run, which always give log-probs."""
    need = cfg.logprobs_needed()
    if need and backend == "http" and not model.startswith("@") and not http_scores_text(model):
        raise InputError(f"stage {stage!r} needs log-probs for {need}, and {model!r} on the http backend is "
                         "served chat-only (no local tokenizer, so no log-probs): run this stage on the "
                         "transformers or vllm backend, or serve a model whose folder is local", file=file,
                         column=column)


@lru_cache(maxsize=4)
def _backend(kind: str, model: str, base_url: str | None, tokenizer: str | None):
    """One judge backend per (kind, model, server) per process: every shard of a run shares it."""
    from pipeline.backends import make_backend

    return make_backend(kind, model, base_url=base_url, tokenizer=tokenizer)


def open_judge(cfg: JudgeConfig, stage_backend=None) -> Judge:
    """The configured judge: its own model, or the stage's backend when `model` is None."""
    if cfg.model is None:
        if stage_backend is None:
            raise InputError("the judge has no model: set judge.model or run the stage with a backend",
                             column="judge.model")
        backend = stage_backend
    else:
        backend = _backend(cfg.backend, cfg.model, cfg.base_url if cfg.backend == "http" else None,
                           cfg.tokenizer if cfg.backend == "http" else None)
    return Judge(backend, mode=cfg.mode, votes=cfg.votes, temperature=cfg.temperature,
                 max_tokens=cfg.max_tokens, seed=cfg.seed, templates=cfg.templates)


def require_logprobs(backend, what: str) -> None:
    """Refuse, before any row runs, a stage option that needs log-probs on a backend without them."""
    if backend is not None and not supports_logprobs(backend):
        raise InputError(f"{what} needs log-probs, and {getattr(backend, 'model_id', 'the backend')!r} is served "
                         "chat-only (http without a local tokenizer): give the http backend a tokenizer or use "
                         "a judge in votes mode", column="backend")
