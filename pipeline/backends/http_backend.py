"""The http backend: any OpenAI-compatible server (vllm serve, SGLang, TGI, llama.cpp, the test server).

Two modes:
- with a local `tokenizer` (recommended; needed for `logprobs`): prompts are chat-templated and tokenized here,
  exactly as the local backends do, and sent to `/v1/completions` as token ids. Outputs then match the local
  backends token for token.
- without one: `/v1/chat/completions`; the server applies its chat template. `continue_` uses vLLM's
  `continue_final_message` extension.
Token ids and counts come from the server (vLLM's `return_token_ids`, `usage`); a server that sends no ids
leaves `token_ids` empty. Requests run on a thread pool (the concurrency cap) and are retried with jittered exponential backoff on
429, 5xx, timeouts and connection errors. The API key is read from an environment variable and never logged.
"""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from pipeline.backends.base import (Completion, LogprobResult, Prompt, SamplingParams, as_messages,
                                    resolve_n)
from pipeline.backends.tokenized import encode_text, load_tokenizer, render_prompt
from pipeline.errors import BackendError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Server root including /v1.")
    served_model: str | None = Field(None, description="The 'model' field of requests; None: the model name.")
    tokenizer: str | None = Field(None, description=(
        "Local tokenizer (a built-in model name or folder): template and tokenize here, use /v1/completions."))
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(300.0, gt=0, description="Per-request timeout (connect, read, write).")
    max_retries: int = Field(5, ge=0, description="Retries after the first attempt on retryable failures.")
    backoff_base_s: float = Field(0.5, ge=0, description="First backoff; doubles per retry (full jitter).")
    backoff_max_s: float = Field(30.0, ge=0, description="Cap on one backoff sleep.")
    vllm_extensions: bool = Field(True, description=(
        "Send vLLM's extra fields (top_k, include_stop_str_in_output, return_token_ids, "
        "continue_final_message). Turn off for servers that reject unknown fields."))


class HTTPBackend:
    def __init__(self, model: str, config: HTTPConfig | None = None, **opts):
        self.config = cfg = config or HTTPConfig(**opts)
        self.model_id = str(model)
        self.served_model = cfg.served_model or self.model_id
        self.weights_hash = f"remote:{cfg.base_url}:{self.served_model}"
        self.tokenizer = None
        if cfg.tokenizer:
            from pipeline.models import resolve_model

            self.tokenizer = load_tokenizer(str(resolve_model(cfg.tokenizer)))
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers,
                                    timeout=httpx.Timeout(cfg.timeout_s),
                                    limits=httpx.Limits(max_connections=cfg.max_concurrency))
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="prefpipe-http")

    # ---- transport --------------------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.config.backoff_max_s)
            except ValueError:
                pass
        return random.uniform(0, min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt))

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries. Raises BackendError naming the route, status and the server's message."""
        url = f"{self.config.base_url.rstrip('/')}{route}"
        last = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                r = self._client.post(route, json=body)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError as e:
                        raise BackendError(f"POST {url}: the server answered {r.status_code} with non-JSON "
                                           f"({r.text[:200]!r})") from e
                last = f"HTTP {r.status_code}: {_server_message(r)}"
                if r.status_code not in RETRY_STATUS:
                    raise BackendError(f"POST {url} failed with {last} (not retried)")
                retry_after = r.headers.get("retry-after")
            if attempt < self.config.max_retries:
                time.sleep(self._backoff(attempt, retry_after))
        raise BackendError(f"POST {url} failed after {self.config.max_retries + 1} attempts; last error: {last}")

    def _map(self, fn, items: list) -> list:
        return list(self._pool.map(fn, items))

    # ---- request bodies ---------------------------------------------------------------------------------

    def _sampling_body(self, sp: SamplingParams, n: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_model, "n": n, "max_tokens": sp.max_tokens,
                                "temperature": sp.temperature, "top_p": sp.top_p}
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.stop:
            body["stop"] = list(sp.stop)
        if self.config.vllm_extensions:
            body["return_token_ids"] = True
            body["skip_special_tokens"] = True
            if sp.top_k_enabled:
                body["top_k"] = sp.top_k
            if sp.include_stop:
                body["include_stop_str_in_output"] = True
        elif sp.top_k_enabled or sp.include_stop:
            raise BackendError("top_k and include_stop need a server with vLLM's extensions (vllm_extensions)")
        return body

    def _complete_ids(self, ids: list[int], sp: SamplingParams, n: int) -> list[Completion]:
        data = self.post("/completions", {**self._sampling_body(sp, n), "prompt": ids})
        return self._parse(data, n, lambda ch: ch.get("text", ""))

    def _chat(self, messages: list[dict], prefix: str | None, sp: SamplingParams, n: int) -> list[Completion]:
        body = {**self._sampling_body(sp, n), "messages": messages}
        if prefix is not None:
            if not self.config.vllm_extensions:
                raise BackendError("continue_ without a local tokenizer needs vLLM's continue_final_message")
            body["messages"] = messages + [{"role": "assistant", "content": prefix}]
            body.update(continue_final_message=True, add_generation_prompt=False)
        data = self.post("/chat/completions", body)
        return self._parse(data, n, lambda ch: (ch.get("message") or {}).get("content") or "")

    def _parse(self, data: dict, n: int, text_of) -> list[Completion]:
        choices = sorted(data.get("choices") or [], key=lambda ch: ch.get("index", 0))
        if len(choices) != n:
            raise BackendError(f"the server returned {len(choices)} choices, asked for {n}")
        usage = (data.get("usage") or {}).get("completion_tokens")
        out = []
        for ch in choices:
            text = text_of(ch)
            ids = list(ch.get("token_ids") or [])  # vLLM's return_token_ids; other servers: none
            n_tok = len(ids) or (int(usage) if usage is not None and n == 1 else 0)
            reason = _finish(ch)
            stop_reason = ch.get("stop_reason")
            stop_str = stop_reason if reason == "stop" and isinstance(stop_reason, str) else None
            out.append(Completion(text=text, token_ids=ids, n_tokens=n_tok, finish_reason=reason,
                                  stop_str=stop_str))
        return out

    # ---- Backend primitives -----------------------------------------------------------------------------

    def _run(self, prompts: list[Prompt], prefixes: list[str] | None, sp: SamplingParams | None,
             n: int | None) -> list[list[Completion]]:
        sp = sp or SamplingParams()
        k = resolve_n(sp, n)
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} assistant prefixes")
        jobs = [(p, prefixes[i] if prefixes is not None else None) for i, p in enumerate(prompts)]
        if self.tokenizer is not None:
            # Tokenize here, not in the worker threads: one Rust tokenizer shared across threads can fail
            # with "Already borrowed".
            ids = [encode_text(self.tokenizer, render_prompt(self.tokenizer, p, prefix)) for p, prefix in jobs]
            return self._map(lambda i: self._complete_ids(i, sp, k), ids)
        return self._map(lambda j: self._chat(as_messages(j[0]), j[1], sp, k), jobs)

    def generate(self, prompts: list[Prompt], sampling: SamplingParams | None = None,
                 n: int | None = None) -> list[list[Completion]]:
        return self._run(prompts, None, sampling, n)

    def continue_(self, prompts: list[Prompt], assistant_prefixes: list[str],
                  sampling: SamplingParams | None = None, n: int | None = None) -> list[list[Completion]]:
        return self._run(prompts, assistant_prefixes, sampling, n)

    def _score(self, p_ids: list[int], c_ids: list[int]) -> LogprobResult:
        if not c_ids:
            return LogprobResult(total=0.0, per_token=[], token_ids=[])
        body = {"model": self.served_model, "prompt": p_ids + c_ids, "max_tokens": 1, "temperature": 0.0,
                "echo": True, "logprobs": 1}
        data = self.post("/completions", body)
        try:
            lps = data["choices"][0]["logprobs"]["token_logprobs"]
            per = [float(x) for x in lps[len(p_ids):len(p_ids) + len(c_ids)]]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BackendError(f"the server's echo log-probs are missing or malformed ({e!r})") from e
        if len(per) != len(c_ids):
            raise BackendError(f"the server echoed {len(per)} completion log-probs, expected {len(c_ids)}")
        return LogprobResult(total=float(sum(per)), per_token=per, token_ids=list(c_ids))

    def logprobs(self, prompts: list[Prompt], completions: list[str]) -> list[LogprobResult]:
        if len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.tokenizer is None:
            raise BackendError("http logprobs need a local tokenizer (HTTPConfig.tokenizer) to find the "
                               "completion's tokens in the echoed prompt")
        tok = self.tokenizer
        pairs = [(encode_text(tok, render_prompt(tok, p)), encode_text(tok, c)) for p, c in zip(prompts, completions)]
        return self._map(lambda pc: self._score(*pc), pairs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _server_message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or r.json().get("message")
        if isinstance(err, dict):
            err = err.get("message")
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return r.text[:300]


def _finish(ch: dict) -> str:
    """OpenAI's 'stop' covers EOS and stop strings; vLLM's stop_reason tells them apart (a string: a stop
    string; None or a token id: end of sequence). Servers without stop_reason get 'stop'."""
    reason = ch.get("finish_reason")
    if reason == "length":
        return "length"
    if "stop_reason" in ch:
        return "stop" if isinstance(ch["stop_reason"], str) else "eos"
    return "stop"
