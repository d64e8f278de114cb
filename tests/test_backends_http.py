"""The http backend's transport: retries, give-up, non-retryable errors, timeouts, connection errors, the
concurrency cap and the API key (sent, never shown). Runs against the real test server on 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from conftest_backends import free_port
from pipeline.backends import SamplingParams
from pipeline.backends.fixtures import build_tiny_llama
from pipeline.backends.hf import TransformersBackend
from pipeline.backends.http_backend import HTTPBackend
from pipeline.backends.testserver import serving
from pipeline.errors import BackendError

torch.set_num_threads(1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    be = TransformersBackend(str(build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")))
    yield be
    be.close()


def test_retries_503_twice_then_succeeds(local):
    want = local.generate(["hi"], GREEDY)[0][0]
    with serving(local, fail_first=2) as srv:
        with HTTPBackend("m", base_url=srv.url, tokenizer=str(local.path), max_retries=3, **FAST) as be:
            got = be.generate(["hi"], GREEDY)[0][0]
        assert srv.posts == 3
    assert got.token_ids == want.token_ids and got.text == want.text


def test_gives_up_after_max_retries_with_the_last_error(local):
    with serving(local, fail_first=100) as srv:
        with HTTPBackend("m", base_url=srv.url, max_retries=2, **FAST) as be:
            with pytest.raises(BackendError) as err:
                be.generate(["hi"], GREEDY)
        assert srv.posts == 3
    msg = str(err.value)
    assert "after 3 attempts" in msg and "HTTP 503" in msg and "injected failure" in msg


def test_client_errors_are_not_retried(local):
    with serving(local) as srv:
        with HTTPBackend("m", base_url=srv.url, max_retries=4, **FAST) as be:
            with pytest.raises(BackendError) as err:
                be.post("/completions", {"prompt": {"not": "a prompt"}, "max_tokens": 2})
        assert srv.posts == 1
    assert "HTTP 400" in str(err.value) and "not retried" in str(err.value)


def test_connection_refused_is_retried_then_reported():
    port = free_port()  # nothing listens there
    with HTTPBackend("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, **FAST) as be:
        with pytest.raises(BackendError) as err:
            be.generate(["hi"], GREEDY)
    assert "after 2 attempts" in str(err.value) and "ConnectError" in str(err.value)


def test_read_timeout_is_reported():
    # A socket that accepts and never answers.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    conns = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        with HTTPBackend("m", base_url=url, timeout_s=0.3, max_retries=1, **FAST) as be:
            with pytest.raises(BackendError) as err:
                be.generate(["hi"], GREEDY)
        assert "ReadTimeout" in str(err.value)
        deadline = time.monotonic() + 5  # the accept thread may lag behind the client on a loaded machine
        while len(conns) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(conns) == 2  # first attempt + one retry
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        sock.close()


def test_concurrency_cap(local):
    with serving(local, delay_s=0.3) as srv:
        with HTTPBackend("m", base_url=srv.url, tokenizer=str(local.path), max_concurrency=2) as be:
            out = be.generate(["a", "b", "c", "d", "e"], GREEDY)
        assert srv.posts == 5
        assert srv.max_in_flight == 2
    assert [o[0].text for o in out] == [o[0].text for o in local.generate(["a", "b", "c", "d", "e"], GREEDY)]


def test_api_key_sent_from_env_and_never_in_errors(local, monkeypatch):
    secret = "sk-prefpipe-test-SECRET"
    monkeypatch.setenv("PREFPIPE_TEST_KEY", secret)
    with serving(local, fail_first=100) as srv:
        with HTTPBackend("m", base_url=srv.url, api_key_env="PREFPIPE_TEST_KEY", max_retries=1, **FAST) as be:
            with pytest.raises(BackendError) as err:
                be.generate(["hi"], GREEDY)
            assert secret not in repr(be.config) and secret not in str(err.value)
        assert srv.authorizations == [f"Bearer {secret}"] * 2


def test_no_key_no_header(local, monkeypatch):
    monkeypatch.delenv("PREFPIPE_TEST_KEY", raising=False)
    with serving(local) as srv:
        with HTTPBackend("m", base_url=srv.url, api_key_env="PREFPIPE_TEST_KEY") as be:
            be.generate(["hi"], GREEDY)
        assert srv.authorizations == [None]


def test_logprobs_without_tokenizer_is_a_clear_error(local):
    with serving(local) as srv:
        with HTTPBackend("m", base_url=srv.url) as be:
            with pytest.raises(BackendError, match="local tokenizer"):
                be.logprobs(["hi"], ["x"])


def test_chat_mode_finish_reasons_and_stop(local):
    sp = SamplingParams(temperature=0.0, max_tokens=12)
    want = local.generate(["What is 2+3?"], sp)[0][0]
    stop = want.text[3:5]
    sp_stop = sp.model_copy(update={"stop": [stop]})
    want_stop = local.generate(["What is 2+3?"], sp_stop)[0][0]
    with serving(local) as srv:
        with HTTPBackend("m", base_url=srv.url) as be:
            got = be.generate(["What is 2+3?"], sp)[0][0]
            got_stop = be.generate(["What is 2+3?"], sp_stop)[0][0]
    assert (got.text, got.finish_reason, got.n_tokens) == (want.text, want.finish_reason, want.n_tokens)
    assert (got_stop.text, got_stop.finish_reason, got_stop.stop_str) == (want_stop.text, "stop", stop)
