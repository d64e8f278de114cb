"""Reward arms inside `prefpipe run` (#30): a train arm with `mode: reward` trains a verifier, is not evaluated as a
policy, and a later stage values its nodes with it through `value_model: "@ARM"`. Bad references exit 2 at load,
naming the file and the key, before anything runs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.config import load_run_config
from flows.parallel import plan
from tests.test_config_load import _assert_refused, _files, refused_in_process

PREFPIPE = Path(sys.executable).parent / "prefpipe"
SEARCH = {"variant": "best_first", "best_first_k": 4, "expansion_budget": 6, "validity_rollouts": 0,
          "temperature": 1.0, "top_p": 1.0, "top_k": 0}

# A rollout-valued search, a verifier trained on its pairs, a search valued by that verifier on other problems,
# and a DPO arm on the learned-value pairs.
BASE = {
    "name": "rmtest",
    "threads": 1,
    "inputs": {"task": {"preset": "tiny", "split": "train", "n": 40}},
    "stages": [
        {"id": "tree-roll", "stage": "tree-search", "limit": 20, "shard_size": 20,
         "config": {**SEARCH, "value_fn": "rollout", "rollouts": 2}},
        {"id": "tree-rm", "stage": "tree-search", "skip": 20, "shard_size": 20,
         "config": {**SEARCH, "value_fn": "reward_model", "value_model": "@rm", "step_min_margin": 0.0}}],
    "train": [
        {"name": "rm", "data": "tree-roll", "config": {"mode": "reward", "lr": 3e-4, "max_steps": 3, "micro_batch": 4,
                                                      "reward": {"eval_fraction": 0.5}, "progress": False}},
        {"name": "dpo", "data": "tree-rm", "config": {"lr": 1e-5, "max_steps": 2, "micro_batch": 2,
                                                      "progress": False}}],
    "eval": {"task": {"preset": "tiny", "split": "eval", "n": 8}, "max_tokens": 64},
}


def _config(tmp_path: Path, edit=None) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    cfg["output_dir"] = str(tmp_path / "out")
    if edit is not None:
        edit(cfg)
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_the_plan_trains_the_verifier_before_the_stage_it_values(tmp_path):
    cfg, _ = load_run_config(_config(tmp_path))
    keys = [k for k, _ in plan(cfg)]
    assert keys == ["inputs", "eval:base", "stage:tree-roll", "train:rm", "stage:tree-rm", "train:dpo", "eval:dpo",
                    "report"]  # the reward arm gets no eval
    assert dict(plan(cfg))["stage:tree-rm"] == ["inputs", "train:rm"]
    assert not (tmp_path / "out").exists()


def _stage_cfg(i: int, **fields):
    return lambda c: c["stages"][i]["config"].update(fields)


def _empty_folder(c):
    Path(c["output_dir"]).parent.joinpath("empty").mkdir()
    c["stages"][1]["config"]["value_model"] = str(Path(c["output_dir"]).parent / "empty")


# (edit of BASE, key named in the error, text in the error)
CASES = {
    "unknown-arm": (_stage_cfg(1, value_model="@nope"), "stages.1.config.value_model", "names no training arm"),
    "not-a-reward-arm": (_stage_cfg(1, value_model="@dpo"), "stages.1.config.value_model",
                         "'@dpo' is not a reward arm (its config needs mode: reward)"),
    "missing-folder": (_stage_cfg(1, value_model="no/such/rm"), "stages.1.config.value_model",
                       "reward-model folder 'no/such/rm' does not exist"),
    "folder-without-model": (_empty_folder, "stages.1.config.value_model", "is not a model folder"),
    "arm-data-after-stage": (lambda c: c["train"][0].update(data="tree-rm"), "stages.1.config.value_model",
                             "trains on 'tree-rm', which is not a stage listed before this one"),
    "reward-arm-as-policy": (lambda c: c["stages"].append({"id": "late", "stage": "sample-pairs", "model": "@rm",
                                                           "phase": "post_train"}),
                             "stages.2.model", "is a reward arm (a classifier), not a policy"),
    "reward-arm-in-pool": (lambda c: c["eval"].update(pools={"p": ["rm"]}), "eval.pools.p",
                           "not base, a policy arm or a compare_with label"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_reward_arm_reference(case, tmp_path, monkeypatch, capsys):
    edit, key, text = CASES[case]
    refused_in_process(_config(tmp_path, edit), key, text, monkeypatch, capsys)


def test_prefpipe_run_refuses_an_unknown_value_model_arm(tmp_path):
    """The same check through the real `prefpipe run` (Prefect on): exit 2, one line, nothing written."""
    path = _config(tmp_path, _stage_cfg(1, value_model="@verifier"))
    before = _files(tmp_path)
    env = {**os.environ, "PREFPIPE_NO_PROGRESS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([str(PREFPIPE), "run", str(path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    _assert_refused(proc.returncode, proc.stderr, path, "stages.1.config.value_model",
                    "value_model '@verifier' names no training arm; arms: rm, dpo")
    assert proc.stdout == "" and _files(tmp_path) == before


@pytest.mark.slow  # about 35 s on one core: two searches, a verifier, a DPO arm, two evals
def test_the_loop_runs_in_one_config(tmp_path):
    from pipeline.judges.reward_model import load_scorer
    from pipeline.store import RunStore
    from pipeline.train.data import read_table
    from pipeline.train.reward import split_prompts
    from stages.tree.nodes import trees_from_table

    path = _config(tmp_path)
    env = {**os.environ, "PREFPIPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(PREFPIPE), "run", str(path), "--no-prefect"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    store = RunStore(out)
    inputs = pq.read_table(out / "inputs" / "prompts.parquet")["prompt_id"].to_pylist()
    assert len(inputs) == 40
    roll, learned = (store.stage(s).read("trees").to_pylist() for s in ("tree-roll", "tree-rm"))
    assert [t["prompt_id"] for t in roll] == inputs[:20]       # limit 20
    assert [t["prompt_id"] for t in learned] == inputs[20:]    # skip 20: problems the verifier never saw
    # rollout values: every valued non-terminal node has a success share of its 2 rollouts
    shares = [n["rollout_success"] for t in roll for n in t["nodes"] if n["parent_id"] and not n["is_terminal"]]
    assert shares and all(s in (0.0, 0.5, 1.0) for s in shares)
    # learned values: no rollout anywhere, each non-terminal node's value is sigma(the verifier's score)
    scorer = load_scorer(str(out / "train" / "rm" / "final"))
    checked = 0
    for tree, _ in trees_from_table(store.stage("tree-rm").read("trees")):
        for n in tree.nodes.values():
            if n.parent_id is None or n.is_terminal:
                continue
            s = scorer.score([tree.prompt], [tree.response(n)])[0]
            assert n.rollout_success is None and n.reward == pytest.approx(1 / (1 + math.exp(-s)), abs=1e-6)
            checked += 1
    assert checked >= 20  # every tree's first expansion has a non-terminal child (tiny problems take 3-4 steps)
    # the verifier is not evaluated as a policy; the report shows its held-out pairwise accuracy, which is the
    # saved folder's ranking of the held-out half of the prompts' pairs
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["base.json", "dpo.json"]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["evals"]) == {"base", "dpo"}
    rm = summary["train"]["rm"]["reward_eval"]
    _, held = split_prompts(read_table(str(out / "tree-roll")), 0.5, seed=42)
    c = scorer.score(held["prompt"].to_pylist(), held["chosen"].to_pylist())
    r = scorer.score(held["prompt"].to_pylist(), held["rejected"].to_pylist())
    assert rm["pairs"] == held.num_rows > 0
    assert rm["accuracy"] == sum(a > b for a, b in zip(c, r)) / held.num_rows
    assert rm["margin"] == pytest.approx(sum(a - b for a, b in zip(c, r)) / held.num_rows, abs=1e-5)
    report = (out / "report" / "report.md").read_text()
    assert f"| rm | tree-roll | 3 | {held.num_rows} | {100 * rm['accuracy']:.1f} % |" in report
    assert summary["headline"]["treatment"] == "dpo"


@pytest.mark.parametrize("value_model, why", [
    ("no/such", "Value error, reward-model folder 'no/such' does not exist (relative paths start at the working "
                "directory)"),
    # `@ARM` means a run config's training arm; a single stage command has none, so it is refused at load instead
    # of failing when the first node is scored, after the policy loaded
    ("@rm", "'@rm' names a run config's training arm; a stage command takes a model folder"),
])
def test_stage_command_refuses_a_bad_value_model(tmp_path, value_model, why):
    """`prefpipe stage tree-search --value-model X` checks X at load: exit 2 naming the option, before the policy
    loads, no output folder."""
    from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table

    pq.write_table(problems_to_table(make_split(TaskConfig.tiny(), "train", 2)), tmp_path / "p.parquet")
    proc = subprocess.run([str(PREFPIPE), "stage", "tree-search", "-i", "p.parquet", "-o", "out", "--value-fn",
                           "reward_model", "--value-model", value_model], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PREFPIPE_NO_PROGRESS": "1"})
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: file <command line>, column 'value_model': {why}"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]
