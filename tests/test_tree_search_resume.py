"""SIGKILL in the middle of `prefpipe stage tree-search`, then rerun: the run completes with no duplicate pairs
and the same rows as an uninterrupted run (created_at, the wall-clock time a row was made, aside).

The model is the tiny random Llama fixture: resume is about the store and seeds, not about answer quality.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
OPTS = ["--shard-size", "1", "--iterations", "3", "--expansion-width", "2", "--rollouts", "2",
        "--step-max-tokens", "8", "--rollout-max-tokens", "12", "--validity-rollouts", "2", "--max-depth", "3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.backends.fixtures import build_tiny_llama
    from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table

    d = tmp_path_factory.mktemp("ts")
    model = build_tiny_llama(d / "model")
    prompts = d / "prompts.parquet"
    pq.write_table(problems_to_table(make_split(TaskConfig.tiny(), "train", 6)), prompts)
    return d, model, prompts


def _start(run_dir, model, prompts, slow: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from flows.app import app; app()", "stage", "tree-search", "-i", str(prompts),
           "-o", str(run_dir), "--model", str(model), *OPTS]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _tables(run_dir):
    st = RunStore(run_dir).stage("tree-search")
    return {o: st.read(o) for o in ("main", "trees", "lists")}


def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(setup):
    d, model, prompts = setup
    ref = _start(d / "ref", model, prompts)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err.decode()[-2000:]
    reference = _tables(d / "ref")
    assert reference["trees"].num_rows == 6

    p = _start(d / "run", model, prompts)
    manifest = d / "run/tree-search/manifest.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert p.poll() is None, "the stage finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    m = json.loads(manifest.read_text())
    assert not m["complete"] and 1 <= len(m["shards"]) < 6

    again = _start(d / "run", model, prompts)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-2000:]
    got = _tables(d / "run")
    for name in ("main", "trees", "lists"):
        a, b = got[name], reference[name]
        if "created_at" in a.column_names:
            a, b = a.drop_columns(["created_at"]), b.drop_columns(["created_at"])
        assert a.num_rows == b.num_rows and a.equals(b), name
    pairs = got["main"]
    assert len(pc.unique(pairs.column("pair_id"))) == pairs.num_rows
    assert len(pc.unique(pairs.column("row_key"))) == pairs.num_rows
    assert json.loads(manifest.read_text())["complete"]
