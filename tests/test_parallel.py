"""flows/parallel.py: the step plan's dependencies, and `workers: 2` giving exactly the one-process rows."""
import pytest
import yaml

from flows.config import load_run_config
from flows.parallel import plan
from pipeline.store import RunStore


@pytest.fixture(autouse=True)
def _toy_stage(monkeypatch):
    monkeypatch.setenv("PREFPIPE_STAGE_MODULES", "tests.helpers.toy_stage")  # spawned workers inherit it
    monkeypatch.setenv("PREFPIPE_NO_PROGRESS", "1")


def _config(tmp_path, name: str, **extra):
    cfg = {"name": name, "output_dir": str(tmp_path / name),
           "inputs": {"task": {"preset": "tiny", "split": "train", "n": 40}},
           "stages": [{"id": "pairs", "stage": "toy-pairs", "shard_size": 8},
                      {"id": "pairs2", "stage": "toy-pairs", "input": "pairs@aux", "shard_size": 16,
                       "config": {"seed": 3}},
                      {"id": "few", "stage": "toy-pairs", "limit": 10, "shard_size": 4}],
           "report": False, **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_plan_waits_only_for_what_each_step_reads(tmp_path):
    p = _config(tmp_path, "plan", train=[{"name": "a", "data": "pairs2"}, {"name": "b", "data": "inputs"}],
                eval={"task": {"split": "eval", "n": 5}}, report=True, export={"out": "export"})
    cfg, _ = load_run_config(p)
    stages = ["inputs", "eval:base", "stage:pairs", "stage:pairs2", "stage:few", "train:a", "train:b"]
    assert plan(cfg) == [
        ("inputs", []), ("eval:base", []), ("stage:pairs", ["inputs"]), ("stage:pairs2", ["stage:pairs"]),
        ("stage:few", ["inputs"]), ("train:a", ["stage:pairs2"]), ("train:b", ["inputs"]),
        ("eval:a", ["train:a"]), ("eval:b", ["train:b"]),
        ("report", stages + ["eval:a", "eval:b"]), ("export", stages + ["eval:a", "eval:b", "report"])]


def test_two_workers_write_the_rows_of_one_process(tmp_path):
    from flows.flow import run_local

    run_local(str(_config(tmp_path, "one")))
    run_local(str(_config(tmp_path, "two", workers=2)))
    for stage, rows in (("pairs", 40), ("pairs2", 40), ("few", 10)):
        a, b = (RunStore(tmp_path / d).stage(stage).read() for d in ("one", "two"))
        assert a.num_rows == rows and a.equals(b)
    shards = RunStore(tmp_path / "two").stage("pairs").manifest()["shards"]
    assert sorted(map(int, shards)) == list(range(5))


def test_workers_must_be_positive(tmp_path):
    from schemas.errors import InputError

    with pytest.raises(InputError, match="workers"):
        load_run_config(_config(tmp_path, "bad", workers=0))


@pytest.mark.slow
def test_prefect_flow_with_two_workers_writes_the_same_rows(tmp_path):
    """The Prefect path submits the plan's steps with their dependencies; rows equal the one-process run."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.flow import prefpipe_flow, run_local

    run_local(str(_config(tmp_path, "one")))
    with prefect_test_harness(server_startup_timeout=120):
        out = prefpipe_flow(str(_config(tmp_path, "two", workers=2)))
    assert set(out) == {"inputs", "stage:pairs", "stage:pairs2", "stage:few"}
    for stage in ("pairs", "pairs2", "few"):
        assert RunStore(tmp_path / "one").stage(stage).read().equals(RunStore(tmp_path / "two").stage(stage).read())
