"""Stages that need teacher-forced log-probs (self-label's implicit rewards, tree search's `value_fn: logprob`) are
refused on a chat-only http model (no local tokenizer) when the config loads, with exit 2 and one `error:` line
naming the stage and what it needs, before any model loads or any file is written; a Python caller that hands
one a chat-only backend gets the same refusal before any generation."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.backends.http_backend import HTTPBackend
from pipeline.backends.testserver import serving
from pipeline.errors import InputError
from pipeline.judges.config import http_scores_text
from pipeline.judges.scripted import ScriptedJudgeModel
from pipeline.stage import StageContext
from tests.helpers.cli import run_cli

HOSTED = "gpt-4o-mini"  # a served name only: the http backend finds no local tokenizer for it


def _run_config(tmp_path: Path, stage: dict) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "p0", "prompt": "Say hello."}\n')
    cfg = {"name": "chatonly", "output_dir": str(tmp_path / "out"), "model": HOSTED, "backend": "http",
           "base_url": "http://127.0.0.1:9/v1", "inputs": {"file": str(prompts)}, "stages": [stage]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _one_error_line(code: int, out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_known_without_loading_which_http_models_give_logprobs(tmp_path):
    assert http_scores_text("smollm2-135m") and http_scores_text("tiny-policy")
    assert not http_scores_text(HOSTED)
    assert http_scores_text(HOSTED, tokenizer="tiny-policy")        # a local tokenizer gives log-probs
    (tmp_path / "config.json").write_text("{}")
    assert http_scores_text(str(tmp_path))                          # a local folder is its own tokenizer


@pytest.mark.parametrize("stage, need", [
    ({"id": "spa", "stage": "self-label", "config": {"n_samples": 2}}, "implicit rewards"),
    ({"id": "tree", "stage": "tree-search", "config": {"value_fn": "logprob"}}, "value_fn logprob"),
])
def test_run_config_refuses_a_logprob_stage_on_a_chat_only_model(tmp_path, monkeypatch, capsys, stage, need):
    path = _run_config(tmp_path, stage)
    code, out = run_cli(monkeypatch, capsys, "run", path)
    line = _one_error_line(code, out)
    assert f"file {path}" in line and "column 'stages.0.backend'" in line, line
    assert f"stage '{stage['stage']}' needs log-probs for" in line and need in line and HOSTED in line, line
    assert not (tmp_path / "out").exists()


def test_run_config_takes_the_same_stages_where_logprobs_exist(tmp_path):
    """The check is about the model, not the stage: generation-only settings, a local model over http and the
    step's own backend override all load."""
    from flows.config import load_run_config
    load_run_config(_run_config(tmp_path, {"stage": "tree-search", "config": {"value_fn": "rollout"}}))
    load_run_config(_run_config(tmp_path, {"stage": "self-label", "model": "smollm2-135m"}))
    load_run_config(_run_config(tmp_path, {"stage": "self-label", "backend": "transformers",
                                           "model": "tiny-policy"}))


def test_stage_command_refuses_self_label_on_a_chat_only_model(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_id": "p0", "prompt": "Say hello."}\n')
    code, out = run_cli(monkeypatch, capsys, "stage", "self-label", "--input", prompts, "--run-dir",
                        tmp_path / "run", "--backend", "http", "--model", HOSTED, "--base-url",
                        "http://127.0.0.1:9/v1")
    line = _one_error_line(code, out)
    assert "column '--backend'" in line and "stage 'self-label' needs log-probs" in line, line
    assert not (tmp_path / "run").exists()


def test_self_label_refuses_a_chat_only_backend_before_generating():
    from stages.self_label import SelfLabelConfig, run
    model = ScriptedJudgeModel(lambda q: {"Yes": 1.0})
    with serving(model, served_model="chat") as srv, HTTPBackend("chat", base_url=srv.url, max_retries=0) as be:
        calls = []
        be.generate = lambda *a, **k: calls.append("generate")
        rows = pa.Table.from_pylist([{"prompt_id": "p0", "prompt": "Say hello."}])
        with pytest.raises(InputError, match="self-label .*implicit rewards.* needs log-probs"):
            run(rows, SelfLabelConfig(), be, StageContext("fp", 0, 1))
        assert calls == []
