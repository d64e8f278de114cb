import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.engine import StageFailed, run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore, StoreError
from tests.helpers.toy_stage import ToyConfig, prompts

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_stage("toy-pairs")


def _run(run_dir, n=50, shard_size=8, **cfg):
    return run_stage(SPEC, prompts(n), ToyConfig(**cfg), None, RunStore(run_dir), shard_size=shard_size,
                     progress=False)


def test_run_writes_shards_manifest_and_reads_back(tmp_path):
    res = _run(tmp_path / "run")
    st = res.store
    m = st.manifest()
    assert m["complete"] and len(m["shards"]) == 7            # ceil(50 / 8)
    assert sorted(p.name for p in st.dir.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(7)]
    t = st.read()
    assert t.num_rows == 50 and t.schema.field("stage").type == pa.dictionary(pa.int8(), pa.string())
    assert t.column("prompt_id").to_pylist() == [f"p-{i}" for i in range(50)]  # input order kept
    assert st.read("aux").num_rows == 50
    streamed = sum(b.num_rows for b in st.iter_batches(batch_size=5))
    assert streamed == 50
    assert res.summary["status"]["main"] == {"ok": 50}


def test_rerun_skips_finished_shards(tmp_path):
    _run(tmp_path / "run")
    calls = []
    run_stage(SPEC, prompts(50), ToyConfig(), None, RunStore(tmp_path / "run"), shard_size=8, progress=False,
              on_shard=calls.append)
    assert calls == []  # nothing recomputed


def test_other_config_refuses_to_mix(tmp_path):
    _run(tmp_path / "run")
    with pytest.raises(StoreError, match="another configuration"):
        _run(tmp_path / "run", fail_every=3)
    _ = run_stage(SPEC, prompts(50), ToyConfig(seed=5), None, RunStore(tmp_path / "run"),
                  shard_size=8, progress=False, overwrite=True)


def test_changed_input_is_detected(tmp_path):
    _run(tmp_path / "run")
    t = prompts(50)
    t = t.set_column(1, "prompt", pa.array([f"other {i}" for i in range(50)]))
    changed = pa.table({"prompt_id": [f"q-{i}" for i in range(50)], "prompt": t.column("prompt")})
    with pytest.raises(StoreError, match="changed"):
        run_stage(SPEC, changed, ToyConfig(), None, RunStore(tmp_path / "run"), shard_size=8, progress=False)


def test_failure_threshold(tmp_path):
    with pytest.raises(StageFailed, match="5 of 50 rows failed"):
        _run(tmp_path / "a", fail_every=10)        # p-0, p-10, ... p-40 fail: 10 % > 1 %
    res = run_stage(SPEC, prompts(50), ToyConfig(fail_every=10), None, RunStore(tmp_path / "b"), shard_size=8,
                    progress=False, fail_threshold=0.2)
    assert res.summary["status"]["main"] == {"ok": 45, "failed": 5}
    assert res.summary["first_errors"][0] == "toy failure"


def _child(run_dir, point, k, n=60, shard_size=7, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "tests/helpers/kill_writer.py"), str(run_dir), str(n),
                             str(shard_size), point, str(k)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_same_as_uninterrupted(run_dir, ref):
    t = RunStore(run_dir).stage("toy-pairs").read()
    keys = t.column("row_key")
    assert t.num_rows == ref.num_rows
    assert len(pc.unique(keys)) == t.num_rows
    assert t.equals(ref)
    left = [p.name for p in (Path(run_dir) / "toy-pairs").iterdir() if p.name.startswith(".")]
    assert left == []  # temp files of the killed writer are gone


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    p = _child(d / "run", "none", 0)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    return RunStore(d / "run").stage("toy-pairs").read()


@pytest.mark.parametrize("point,k", [("mid_parquet", 1), ("mid_parquet", 6), ("after_shard_rename", 3),
                                     ("after_shard_rename", 9), ("mid_manifest", 2), ("mid_manifest", 5)])
def test_sigkill_at_write_points_then_rerun(tmp_path, reference, point, k):
    p = _child(tmp_path / "run", point, k)
    assert p.wait(timeout=120) == -signal.SIGKILL
    m = json.loads((tmp_path / "run/toy-pairs/manifest.json").read_text())
    assert not m["complete"]
    p = _child(tmp_path / "run", "none", 0)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    _assert_same_as_uninterrupted(tmp_path / "run", reference)


def test_external_sigkill_while_running(tmp_path, reference):
    p = _child(tmp_path / "run", "none", 0, env_extra={"TOY_SLEEP": "0.15"})
    manifest = tmp_path / "run/toy-pairs/manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.exists():
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 3:
                    break
            except json.JSONDecodeError:
                pass
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    done = len(json.loads(manifest.read_text())["shards"])
    assert 3 <= done < 9
    p = _child(tmp_path / "run", "none", 0)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    _assert_same_as_uninterrupted(tmp_path / "run", reference)


# ---------------------------------------------------------------------------- shards damaged behind the store
def _damage_and_resume(tmp_path, damage) -> tuple[dict, pa.Table]:
    ref = _run(tmp_path / "ref").read()
    _run(tmp_path / "run")
    shard = tmp_path / "run/toy-pairs/part-00002.parquet"
    damage(shard)
    with pytest.raises(StoreError, match=r"shard 2: file .*part-00002\.parquet"):
        RunStore(tmp_path / "run").stage("toy-pairs").read()
    calls = []
    res = run_stage(SPEC, prompts(50), ToyConfig(), None, RunStore(tmp_path / "run"), shard_size=8,
                    progress=False, on_shard=calls.append)
    assert calls == [2]  # only the damaged shard is computed again
    return res.summary, ref


def test_deleted_shard_is_recomputed_on_resume(tmp_path):
    summary, ref = _damage_and_resume(tmp_path, lambda p: p.unlink())
    assert list(summary["recomputed_shards"]) == ["2"] and "is missing" in summary["recomputed_shards"]["2"]
    assert summary["rows"]["main"] == 50
    assert RunStore(tmp_path / "run").stage("toy-pairs").read().equals(ref)


def test_truncated_shard_is_recomputed_on_resume(tmp_path):
    summary, ref = _damage_and_resume(tmp_path, lambda p: p.write_bytes(p.read_bytes()[:-200]))
    assert "truncated" in summary["recomputed_shards"]["2"]
    assert RunStore(tmp_path / "run").stage("toy-pairs").read().equals(ref)


def test_same_size_edit_is_caught_by_the_checksum(tmp_path):
    def flip(p):
        data = bytearray(p.read_bytes())
        data[100] ^= 0x01
        p.write_bytes(bytes(data))
    summary, ref = _damage_and_resume(tmp_path, flip)
    assert "sha256" in summary["recomputed_shards"]["2"]
    assert RunStore(tmp_path / "run").stage("toy-pairs").read().equals(ref)


def test_manifest_records_size_and_sha256(tmp_path):
    import hashlib
    st = _run(tmp_path / "run").store
    for index, shard in st.manifest()["shards"].items():
        for output, name in shard["files"].items():
            data = (st.dir / name).read_bytes()
            assert shard["checksums"][output] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.slow
def test_kill_loop_then_equal_output(tmp_path):
    """>= 20 SIGKILLs at random moments of one stage run (each restart resumes), then the output equals an
    uninterrupted run's: nothing lost, nothing written twice."""
    import random
    rng = random.Random(28)
    work = {"n": 200, "shard_size": 2}  # 100 shards: enough that 20 kills land before the run can finish
    p = _child(tmp_path / "ref", "none", 0, **work)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    reference = RunStore(tmp_path / "ref").stage("toy-pairs").read()
    run_dir, manifest = tmp_path / "run", tmp_path / "run/toy-pairs/manifest.json"
    kills = 0
    while kills < 20:
        p = _child(run_dir, "none", 0, env_extra={"TOY_SLEEP": "0.03"}, **work)
        try:
            deadline = time.time() + 60
            while not manifest.exists() and p.poll() is None and time.time() < deadline:
                time.sleep(0.01)  # the stage has started writing: a kill from here on hits its write path
            time.sleep(rng.uniform(0.0, 0.25))
            if p.poll() is not None:
                break  # finished before this kill: the loop gave it too little work
            p.send_signal(signal.SIGKILL)
            assert p.wait(timeout=30) == -signal.SIGKILL
            kills += 1
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert kills == 20, f"the run finished after {kills} kills"
    assert not json.loads(manifest.read_text())["complete"]
    p = _child(run_dir, "none", 0, **work)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    _assert_same_as_uninterrupted(run_dir, reference)
