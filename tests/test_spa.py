"""flows/spa.py: SPA's loop (self-label stage, then DPO from the labelling policy) on tiny random models."""
import json
from pathlib import Path

import pyarrow as pa
import torch

from flows.spa import spa_iterate
from pipeline.backends.fixtures import build_tiny_llama
from pipeline.store import RunStore
from stages.self_label import SelfLabelConfig
from tests.helpers.cli import run_prefpipe


def test_spa_iterate_runs_label_then_train_with_the_given_beta(tmp_path):
    torch.set_num_threads(1)
    pi0 = build_tiny_llama(tmp_path / "pi0", seed=0, hidden=64, layers=1, heads=1)
    sft = build_tiny_llama(tmp_path / "sft", seed=1, hidden=64, layers=1, heads=1)
    splits = [pa.table({"prompt_id": [f"a{i}" for i in range(4)], "prompt": [f"add {i} and 2" for i in range(4)]}),
              pa.table({"prompt_id": [f"b{i}" for i in range(4)], "prompt": [f"mul {i} and 3" for i in range(4)]})]
    recs = spa_iterate(splits, policy=str(pi0), sft_model=str(sft), run_dir=tmp_path / "spa", beta=0.25,
                       label=SelfLabelConfig(max_tokens=8, temperature=1.0),
                       train_overrides={"max_steps": 2, "micro_batch": 2, "lr": 1e-3, "threads": 1})
    assert [r["iteration"] for r in recs] == [1, 2]
    assert recs[1]["policy_in"] == recs[0]["policy_out"]
    assert all((Path(r["policy_out"]) / "model.safetensors").exists() for r in recs)
    t = RunStore(tmp_path / "spa/iter-2").stage("self-label").read()
    assert set(t["iteration"].to_pylist()) == {2} and set(t["judge_ref_ckpt"].to_pylist()) == {str(sft)}
    assert recs[0]["summary"]["status"]["main"].get("ok", 0) >= 3
    for i in (1, 2):  # the loop's beta (not the 0.1 default) reached the loss of every iteration
        loss = json.loads((tmp_path / f"spa/iter-{i}/train/train_summary.json").read_text())["config"]["loss"]
        assert (loss["loss_type"], loss["beta"]) in ((["distill"], 0.25), ("distill", 0.25))


def test_prefpipe_spa_cuts_the_prompts_into_splits_and_iterates(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    pi0 = build_tiny_llama(tmp_path / "pi0", seed=0, hidden=64, layers=1, heads=1)
    sft = build_tiny_llama(tmp_path / "sft", seed=1, hidden=64, layers=1, heads=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"add {i} and 2"}) + "\n"
                               for i in range(7)))
    code, out, err = run_prefpipe(["spa", prompts, "--policy", pi0, "--sft-model", sft, "--run-dir", tmp_path / "spa",
                                   "--splits", "2", "--max-tokens", "8", "--max-steps", "1", "--beta", "0.5"],
                                  monkeypatch, capsys)
    assert code == 0, err
    recs = json.loads(out)
    assert [r["iteration"] for r in recs] == [1, 2]
    ids = [sorted(RunStore(tmp_path / f"spa/iter-{i}").stage("self-label").read()["prompt_id"].to_pylist())
           for i in (1, 2)]
    assert ids == [[f"p{i}" for i in range(4)], [f"p{i}" for i in range(4, 7)]]  # round(7/2) = 4 in the first
    summary = json.loads((tmp_path / "spa/iter-2/train/train_summary.json").read_text())
    assert summary["config"]["model"] == recs[0]["policy"] and summary["config"]["loss"]["beta"] == 0.5


def test_prefpipe_spa_refuses_more_splits_than_prompts_before_loading_a_model(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p0", "prompt": "add 1 and 2"}) + "\n")
    code, _, err = run_prefpipe(["spa", prompts, "--policy", tmp_path / "missing", "--sft-model", "tiny-policy",
                                 "--run-dir", tmp_path / "spa", "--splits", "2"], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: file {prompts}: 1 prompts cannot make 2 non-empty "
                                                      "splits"]
    assert not (tmp_path / "spa").exists()
