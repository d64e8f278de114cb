"""A rerun into an existing run folder is checked before any step runs (flows/rerun.py): a changed stage config,
skip or limit exits 2 naming the step and the field, and the folders are left as they were; the same config
resumes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import load_run_config
from flows.rerun import check_rerun
from schemas.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _toy_stage(monkeypatch):
    monkeypatch.setenv("PREFPIPE_STAGE_MODULES", "tests.helpers.toy_stage")
    monkeypatch.setenv("PREFPIPE_NO_PROGRESS", "1")


def config(tmp_path, first=None, second=None) -> Path:
    """40 prompts -> `pairs` (toy pairs of each prompt) -> `pairs2` (toy pairs of pairs' 40 aux rows)."""
    cfg = {"name": "toy", "output_dir": str(tmp_path / "run"), "report": False,
           "inputs": {"task": {"preset": "tiny", "split": "train", "n": 40}},
           "stages": [{"id": "pairs", "stage": "toy-pairs", "shard_size": 8, **(first or {})},
                      {"id": "pairs2", "stage": "toy-pairs", "input": "pairs@aux", "shard_size": 16,
                       "config": {"seed": 3}, **(second or {})}]}
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def refusal(path: Path) -> InputError:
    cfg, base = load_run_config(path)
    with pytest.raises(InputError) as e:
        check_rerun(cfg, base, str(path))
    return e.value


def manifests(tmp_path) -> dict:
    return {p.parent.name: p.read_bytes() for p in (tmp_path / "run").glob("*/manifest.json")}


@pytest.fixture
def done_run(tmp_path):
    from flows.flow import run_local

    path = config(tmp_path)
    run_local(str(path))
    cfg, base = load_run_config(path)
    check_rerun(cfg, base, str(path))  # the same config: nothing to refuse
    return tmp_path


def test_changed_stage_config_is_refused_naming_the_field(done_run):
    e = refusal(config(done_run, second={"config": {"seed": 4}}))
    assert e.column == "stages.1.config" and "'pairs2'" in e.reason and "(seed changed)" in e.reason
    e = refusal(config(done_run, first={"config": {"fail_every": 3}}))
    assert e.column == "stages.0.config" and "(fail_every changed)" in e.reason


def test_changed_limit_or_skip_is_refused_with_the_row_counts(done_run):
    e = refusal(config(done_run, second={"limit": 10}))
    assert e.column == "stages.1.limit" and "on 40 input rows" in e.reason and "would read 10" in e.reason
    e = refusal(config(done_run, first={"skip": 5}))
    assert e.column == "stages.0.skip" and "would read 35" in e.reason
    # a limit at or above the input's size reads the same 40 rows: nothing the stage would refuse
    cfg, base = load_run_config(path := config(done_run, first={"limit": 40}, second={"limit": 100}))
    check_rerun(cfg, base, str(path))


def test_an_unknown_upstream_count_leaves_the_check_to_the_stage(done_run):
    import json

    m = done_run / "run" / "pairs" / "manifest.json"
    data = json.loads(m.read_text())
    m.write_text(json.dumps({**data, "complete": False}))
    cfg, base = load_run_config(path := config(done_run, second={"limit": 10}))
    check_rerun(cfg, base, str(path))  # pairs2's input is not known until pairs finishes: the engine checks then
    del data["summary"]["status"]["aux"]  # a finished stage whose summary has no count for that output
    m.write_text(json.dumps(data))
    check_rerun(cfg, base, str(path))


def test_cli_exits_2_before_any_step_and_leaves_the_folders(done_run):
    before = manifests(done_run)
    path = config(done_run, second={"limit": 10})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "flows.app", "run", str(path), "--no-prefect"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stages.1.limit" in errors[0] and str(path) in errors[0]
    assert manifests(done_run) == before
