"""A small OpenAI-compatible server over a local backend, for tests and offline demos (stdlib only).

Routes: GET /v1/models, POST /v1/completions (prompt as text or token ids; echo + logprobs give prompt
log-probs), POST /v1/chat/completions (vLLM's continue_final_message / add_generation_prompt extensions).
Responses carry vLLM's extra fields `stop_reason` and `token_ids`. For client tests: `fail_first=k` answers
the first k POSTs with 503, `delay_s` holds every POST that long, and the server records the Authorization
headers it saw and the most requests it had in flight at once.

    python -m pipeline.backends.testserver --model tiny-policy --port 8000
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.backends.base import Completion, SamplingParams
from pipeline.backends.tokenized import TokenizedBackend, encode_text, render_prompt


class _BadRequest(Exception):
    pass


class OpenAICompatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend: TokenizedBackend, served_model: str, host: str = "127.0.0.1", port: int = 0,
                 fail_first: int = 0, delay_s: float = 0.0):
        super().__init__((host, port), _Handler)
        self.backend, self.served_model = backend, served_model
        self.fail_left, self.delay_s = fail_first, delay_s
        self.posts = 0  # every POST received, failed or not
        self.in_flight = self.max_in_flight = 0
        self.authorizations: list[str | None] = []
        self.lock = threading.Lock()  # guards the counters
        self.model_lock = threading.Lock()  # one model call at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def _sampling(body: dict) -> SamplingParams:
    stop = body.get("stop") or []
    return SamplingParams(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                          top_k=body.get("top_k", 0) or 0, max_tokens=body.get("max_tokens") or 16,
                          stop=[stop] if isinstance(stop, str) else list(stop),
                          include_stop=bool(body.get("include_stop_str_in_output", False)),
                          seed=body.get("seed"), n=body.get("n", 1))


def _choice(i: int, c: Completion, sp: SamplingParams) -> dict[str, Any]:
    return {"index": i, "finish_reason": "length" if c.finish_reason == "length" else "stop",
            "stop_reason": c.stop_str, "token_ids": c.token_ids}


class _Handler(BaseHTTPRequestHandler):
    server: OpenAICompatServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.served_model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        srv = self.server
        with srv.lock:
            srv.posts += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.authorizations.append(self.headers.get("Authorization"))
            fail = srv.fail_left > 0
            srv.fail_left -= fail
        try:
            time.sleep(srv.delay_s)
            self._post(fail)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _post(self, fail: bool) -> None:
        srv = self.server
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        except ValueError:
            self._send(400, {"error": {"message": "the body is not JSON"}})
            return
        if fail:
            self._send(503, {"error": {"message": "overloaded (injected failure)"}})
            return
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            with srv.model_lock:
                payload = route(body)
        except (_BadRequest, ValueError, TypeError) as e:
            self._send(400, {"error": {"message": str(e)}})
            return
        self._send(200, {"id": uuid.uuid4().hex, "created": int(time.time()), "model": srv.served_model,
                         **payload})

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return encode_text(self.server.backend.tokenizer, prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        raise _BadRequest("prompt must be a string or a list of token ids (batches of several: not supported)")

    def _completions(self, body: dict) -> dict:
        be, ids = self.server.backend, self._prompt_ids(body.get("prompt"))
        if body.get("echo"):
            if not body.get("logprobs") and body.get("logprobs") != 0:
                raise _BadRequest("echo is supported together with logprobs only")
            # Teacher-forced log-probs of prompt tokens 1..end (the first token has none, as in vLLM).
            scored = be.score_ids([ids[:1]], [ids[1:]])[0].per_token
            tokens = [be.tokenizer.decode([t]) for t in ids]
            lp = {"tokens": tokens, "token_logprobs": [None] + scored}
            return {"object": "text_completion",
                    "choices": [{"index": 0, "text": be.tokenizer.decode(ids), "logprobs": lp,
                                 "finish_reason": "length", "stop_reason": None}]}
        sp = _sampling(body)
        comps = be.generate_ids([ids], sp, sp.n)[0]
        return {"object": "text_completion",
                "choices": [{**_choice(i, c, sp), "text": c.text} for i, c in enumerate(comps)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": sum(c.n_tokens for c in comps)}}

    def _chat(self, body: dict) -> dict:
        be, messages = self.server.backend, body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list")
        prefix = None
        if body.get("continue_final_message"):
            if body.get("add_generation_prompt", True) or messages[-1].get("role") != "assistant":
                raise _BadRequest("continue_final_message needs add_generation_prompt=false and a final "
                                  "assistant message")
            messages, prefix = messages[:-1], messages[-1]["content"]
        ids = encode_text(be.tokenizer, render_prompt(be.tokenizer, messages, prefix))
        sp = _sampling(body)
        comps = be.generate_ids([ids], sp, sp.n)[0]
        return {"object": "chat.completion",
                "choices": [{**_choice(i, c, sp), "message": {"role": "assistant", "content": c.text}}
                            for i, c in enumerate(comps)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": sum(c.n_tokens for c in comps)}}


@contextmanager
def serving(backend: TokenizedBackend, served_model: str = "test-model", fail_first: int = 0,
            delay_s: float = 0.0):
    """Run the server on a free port of 127.0.0.1 in a thread; yields it (`.url` is the /v1 base)."""
    srv = OpenAICompatServer(backend, served_model, fail_first=fail_first, delay_s=delay_s)
    thread = threading.Thread(target=srv.serve_forever, name="prefpipe-testserver", daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    from pipeline.backends.hf import TransformersBackend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="built-in name or local folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    srv = OpenAICompatServer(TransformersBackend(args.model), args.model, args.host, args.port)
    print(f"serving {args.model} at {srv.url}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
