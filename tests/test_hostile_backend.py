"""Hostile model folders and prompts against the transformers backend (the bundled tiny policy): a folder
without its tokenizer or with truncated weights is exit 2 naming the folder, after the input was checked and
before anything is written; a prompt past the model's context is refused quickly, never generated into."""
import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.backends.base import SamplingParams
from pipeline.backends.tokenized import PromptTooLong
from tests.helpers.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "data" / "tiny-policy"


def _without_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink(missing_ok=True)


def _truncated_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100_000])


def _garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\0" * 64)


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", [_without_tokenizer, _truncated_weights, _garbage_weights, _no_config],
                         ids=lambda f: f.__name__.strip("_"))
def test_broken_model_folder_is_exit_2_naming_it(tmp_path, monkeypatch, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(POLICY, model)
    damage(model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "2+2="}) + "\n")
    code, msg = run_cli(monkeypatch, capsys, "stage", "generate", "-i", prompts, "-o", tmp_path / "run",
                        "--model", model, "--backend", "transformers")
    assert code == 2 and msg.startswith("error: ") and str(model) in msg, msg
    assert "Traceback" not in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_bad_input_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import pipeline.backends as backends

    def no_backend(*a, **k):
        raise AssertionError("the backend loaded before the input was checked")
    monkeypatch.setattr(backends, "make_backend", no_backend)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": " "}) + "\n")
    code, msg = run_cli(monkeypatch, capsys, "stage", "generate", "-i", prompts, "-o", tmp_path / "run")
    assert code == 2 and "p.jsonl" in msg and "prompt" in msg, msg
    (tmp_path / "out.txt").write_text("x")
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "2+2="}) + "\n")
    code, msg = run_cli(monkeypatch, capsys, "stage", "generate", "-i", prompts, "-o", tmp_path / "out.txt")
    assert code == 2 and "out.txt" in msg, msg


@pytest.fixture(scope="module")
def tiny():
    from pipeline.backends import make_backend
    b = make_backend("transformers", "tiny-policy", device="cpu")
    yield b
    b.close()


@pytest.mark.timeout(120)
def test_megabyte_prompt_is_refused_quickly(tiny):
    t0 = time.monotonic()
    with pytest.raises(PromptTooLong, match=r"more than the model's context of 1024 tokens"):
        tiny.generate(["x " * 500_000], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(PromptTooLong, match="prompt \\+ completion"):
        tiny.logprobs(["x " * 600], ["y " * 600])
    assert time.monotonic() - t0 < 100  # tokenizing 1 MB once, no decoding (the timeout guards a hang)


@pytest.mark.timeout(120)
def test_generation_stops_at_the_context(tiny):
    """A prompt that fits leaves context - len(prompt) new tokens at most, whatever max_tokens says."""
    prompt = "hello " * 150
    n_prompt = len(tiny.encode_prompts([prompt])[0])
    assert n_prompt > 1024 - 200
    room = 1024 - n_prompt
    # a banned EOS makes the sample run until a limit: the context here, well below max_tokens
    eos, tiny.eos = tiny.eos, set()
    try:
        out = tiny.generate([prompt], SamplingParams(max_tokens=2000, temperature=1.0, seed=0))
    finally:
        tiny.eos = eos
    assert out[0][0].n_tokens == room and out[0][0].finish_reason == "length"


@pytest.mark.timeout(120)
def test_generate_fails_only_the_row_past_the_context(tmp_path, monkeypatch, capsys):
    from pipeline.store import RunStore

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": k, "prompt": p}) + "\n"
                               for k, p in [("a", "2+2="), ("long", "x " * 5000), ("b", "3+3=")]))
    code, msg = run_cli(monkeypatch, capsys, "stage", "generate", "-i", prompts, "-o", tmp_path / "run",
                        "--max-tokens", "3", "--temperature", "0", "--fail-threshold", "0.5")
    assert code == 0, msg
    rows = RunStore(tmp_path / "run").stage("generate").read().to_pylist()
    assert [(r["prompt_id"], r["status"]) for r in rows] == [("a", "ok"), ("long", "failed"), ("b", "ok")]
    assert "leaves no room in the model's context of 1024 tokens" in rows[1]["error"]
    assert rows[0]["error"] is None and rows[0]["n_tokens"] >= 1
