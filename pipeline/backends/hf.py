"""The transformers backend (CPU and CUDA).

Decoding is a small loop of our own rather than `model.generate`, for four reasons that matter to the stages:
- the prompt is prefilled once and its KV cache expanded to the n samples (no recompute of the shared prompt);
- the randomness comes from a per-call `torch.Generator`, so a seed reproduces samples without touching the
  global RNG;
- finished rows (EOS or a stop string) are dropped from the batch, so a long straggler does not keep paying
  for the rows that are already done;
- finish reasons and token ids come out exactly as vLLM reports them (EOS kept in token_ids, text cut at the
  stop string).
Prompts are sorted by length before batching so left padding stays small.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.backends.base import Completion, LogprobResult, SamplingParams, cut_at_stop
from pipeline.errors import InputError
from pipeline.backends.tokenized import TokenizedBackend, check_context, eos_ids, load_tokenizer


class TransformersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': float32 on CPU, bfloat16 on CUDA.")
    batch_size: int = Field(64, ge=1, description="Most sequences (prompts x samples) in one forward.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the weights (off: unsafe).")
    compact_fraction: float = Field(0.25, ge=0.0, le=1.0, description=(
        "Drop finished rows from the batch (and KV cache) once this fraction of the live rows is done."))


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def filter_logits(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (vLLM's order). Removed tokens get -inf."""
    logits = logits / sp.temperature
    if sp.top_k_enabled and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= sp.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, sp: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Argmax when greedy; otherwise inverse-CDF sampling with one uniform number per row. Drawing the
    uniforms for every row of the batch (not just live ones) keeps a row's sample independent of which other
    rows have finished, so compacting the batch does not change any sample."""
    if sp.greedy:
        return logits.argmax(-1)
    cdf = filter_logits(logits.float(), sp).softmax(-1).cumsum(-1)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # scale by the total so rounding cannot overshoot
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


class _Rows:
    """Bookkeeping for the rows of one decode batch: ids so far, finish reason, stop-string matching."""

    def __init__(self, count: int, tokenizer, sp: SamplingParams, eos: set[int], limits: list[int] | None = None):
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.limits = limits or [sp.max_tokens] * count  # max_tokens, less where the context ends first
        self.finish: list[str | None] = [None] * count
        self.text: list[str | None] = [None] * count
        self.stop_str: list[str | None] = [None] * count
        self.tok, self.sp, self.eos = tokenizer, sp, eos

    def push(self, row: int, token: int) -> bool:
        """Record one token; True when the row is now finished."""
        self.ids[row].append(token)
        if token in self.eos:
            self.finish[row] = "eos"
            return True
        if self.sp.stop:
            text, hit = cut_at_stop(self.decode(row), self.sp.stop, self.sp.include_stop)
            if hit is not None:
                self.finish[row], self.text[row], self.stop_str[row] = "stop", text, hit
                return True
        if len(self.ids[row]) >= self.limits[row]:
            self.finish[row] = "length"
            return True
        return False

    def decode(self, row: int) -> str:
        return self.tok.decode(self.ids[row], skip_special_tokens=True)

    def completions(self) -> list[Completion]:
        return [Completion(text=self.text[r] if self.text[r] is not None else self.decode(r),
                           token_ids=self.ids[r], n_tokens=len(self.ids[r]), finish_reason=self.finish[r],
                           stop_str=self.stop_str[r])
                for r in range(len(self.ids))]


class TransformersBackend(TokenizedBackend):
    """A Hugging Face causal LM from a local folder (see `pipeline.models.resolve_model`)."""

    def __init__(self, model: str, config: TransformersConfig | None = None, **opts):
        from transformers import AutoModelForCausalLM

        from pipeline.models import resolve_model, weights_hash

        self.config = config or TransformersConfig(**opts)
        path = resolve_model(model)
        self.device = _pick_device(self.config.device)
        self.dtype = _pick_dtype(self.config.dtype, self.device)
        try:  # a folder without its tokenizer, or with truncated weights, is bad input: name the folder
            self.tokenizer = load_tokenizer(str(path), self.config.trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"cannot load the tokenizer of this model folder ({type(e).__name__}: "
                             f"{str(e)[:200]})", file=str(path)) from None
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=self.dtype,
                trust_remote_code=self.config.trust_remote_code).to(self.device).eval()
        except Exception as e:  # noqa: BLE001 (safetensors' SafetensorError is none of the builtin kinds)
            raise InputError(f"cannot load the weights of this model folder ({type(e).__name__}: "
                             f"{str(e)[:200]})", file=str(path)) from None
        self.model_id = str(model)
        self.path = path
        self.weights_hash = weights_hash(path)
        self.eos = eos_ids(self.tokenizer, self.model.generation_config)
        # positions past this have no trained embedding: nothing may be generated or scored beyond it
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)

    # ---- generation -------------------------------------------------------------------------------------

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids, mask, positions, cache, keep: int):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=cache is not None, logits_to_keep=keep).logits

    @torch.inference_mode()
    def _decode_batch(self, prompts: list[list[int]], sp: SamplingParams, n: int,
                      gen: torch.Generator) -> list[list[Completion]]:
        from transformers import DynamicCache

        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt has nothing to condition on")
        ids, mask = self._left_pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, keep=1)[:, -1, :]
        if n > 1:  # the prompt was computed once; every sample starts from a copy of its cache
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            positions = positions.repeat_interleave(n, 0)
        last_pos = positions[:, -1]
        room = [sp.max_tokens if self.context_length is None else min(sp.max_tokens, self.context_length - len(p))
                for p in prompts]
        rows = _Rows(len(prompts) * n, self.tokenizer, sp, self.eos, [r for r in room for _ in range(n)])
        live = list(range(len(prompts) * n))  # batch slot -> row
        live_done = [False] * len(live)
        live_index = torch.arange(len(live), device=self.device)
        while True:
            uniforms = None if sp.greedy else torch.rand(
                len(prompts) * n, generator=gen, device=self.device)[live_index]
            tokens = pick_tokens(logits, sp, uniforms)
            for slot, (row, tok) in enumerate(zip(live, tokens.tolist())):
                if not live_done[slot]:
                    live_done[slot] = rows.push(row, tok)
            n_done = sum(live_done)
            if n_done == len(live):
                break
            if n_done and n_done >= self.config.compact_fraction * len(live):
                keep = [s for s, d in enumerate(live_done) if not d]
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                tokens, mask, last_pos = tokens[index], mask[index], last_pos[index]
                live = [live[s] for s in keep]
                live_index = live_index[index]
                live_done = [False] * len(live)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            last_pos = last_pos + 1
            logits = self._forward(tokens[:, None], mask, last_pos[:, None], cache, keep=1)[:, -1, :]
        done = rows.completions()
        return [done[i * n:(i + 1) * n] for i in range(len(prompts))]

    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams,
                     n: int) -> list[list[Completion]]:
        check_context(self.context_length, [len(p) + 1 for p in prompt_ids], "prompt (and one new token)")
        gen = torch.Generator(device=self.device)
        if sampling.seed is None:
            gen.seed()
        else:
            gen.manual_seed(sampling.seed)
        per_batch = max(1, self.config.batch_size // n)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list[list[Completion] | None] = [None] * len(prompt_ids)
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            for i, comps in zip(chunk, self._decode_batch([prompt_ids[i] for i in chunk], sampling, n, gen)):
                out[i] = comps
        return out  # type: ignore[return-value]

    # ---- scoring ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _score_batch(self, prompts: list[list[int]], comps: list[list[int]]) -> list[LogprobResult]:
        width_c = max(len(c) for c in comps)
        if width_c == 0:
            return [LogprobResult(total=0.0, per_token=[], token_ids=[]) for _ in comps]
        ids, mask = self._left_pad([p + c for p, c in zip(prompts, comps)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Left padding right-aligns every completion, so only the last width_c + 1 positions need the head.
        logits = self._forward(ids, mask, positions, None, keep=width_c + 1)[:, :-1, :].float()
        logp = logits.log_softmax(-1)
        targets = ids[:, -width_c:]
        picked = logp.gather(-1, targets[..., None]).squeeze(-1).cpu()
        results = []
        for i, c in enumerate(comps):
            per = picked[i, width_c - len(c):].tolist() if c else []
            results.append(LogprobResult(total=float(sum(per)), per_token=per, token_ids=list(c)))
        return results

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[LogprobResult]:
        check_context(self.context_length, [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)],
                      "prompt + completion")
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
        out: list[LogprobResult | None] = [None] * len(prompt_ids)
        bs = self.config.batch_size
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            res = self._score_batch([prompt_ids[i] for i in chunk], [completion_ids[i] for i in chunk])
            for i, r in zip(chunk, res):
                out[i] = r
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
