"""Flows: the Prefect flow, the direct path and the CLI stage by stage give the same rows; report; kill+rerun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from flows.config import load_run_config
from flows.report import paired_delta
from pipeline.store import RunStore
from schemas.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _toy_stage_env():
    """The toy stage for this module only: a process-wide setting would leak into other tests' subprocesses."""
    saved = {k: os.environ.get(k) for k in ("PREFPIPE_STAGE_MODULES", "PREFPIPE_NO_PROGRESS")}
    os.environ["PREFPIPE_STAGE_MODULES"] = "tests.helpers.toy_stage"
    os.environ["PREFPIPE_NO_PROGRESS"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_config(tmp_path, name="toy", n=40, **extra) -> Path:
    cfg = {"name": name, "output_dir": str(tmp_path / name),
           "inputs": {"task": {"preset": "tiny", "split": "train", "n": n}},
           "stages": [{"id": "pairs", "stage": "toy-pairs", "shard_size": 8},
                      {"id": "pairs2", "stage": "toy-pairs", "input": "pairs@aux", "shard_size": 16,
                       "config": {"seed": 3}}],
           "report": True, **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _rows(run_dir: Path, stage: str) -> pa.Table:
    return RunStore(run_dir).stage(stage).read()


def test_flow_local_and_cli_give_same_rows(tmp_path, prefect_harness, monkeypatch):
    from flows.flow import prefpipe_flow, run_local

    out = prefpipe_flow(str(write_config(tmp_path, "viaflow")))
    assert Path(out["report"], "report.md").exists()
    run_local(str(write_config(tmp_path, "direct")))
    # the CLI, stage by stage, on the same inputs
    import flows.app as cli
    from pipeline.stage import get_stage
    from pipeline.stage_cli import register_stage_commands
    register_stage_commands(cli.stage_app, [get_stage("toy-pairs")])
    inputs = tmp_path / "direct/inputs/prompts.parquet"
    for args in (["stage", "toy-pairs", "-i", inputs, "-o", tmp_path / "cli", "--shard-size", "8"],):
        monkeypatch.setattr(sys, "argv", ["prefpipe", *map(str, args)])
        cli.main()
    a, b, c = (_rows(tmp_path / d, s) for d, s in (("viaflow", "pairs"), ("direct", "pairs"), ("cli", "toy-pairs")))
    assert a.num_rows == 40 and a.equals(b) and b.equals(c)
    assert _rows(tmp_path / "viaflow", "pairs2").equals(_rows(tmp_path / "direct", "pairs2"))


def test_report_artifact_is_published(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from flows.flow import prefpipe_flow
    import anyio

    prefpipe_flow(str(write_config(tmp_path, "artifact")))

    async def read():
        async with get_client() as client:
            return await client.read_artifacts()
    arts = anyio.run(read)
    md = [a for a in arts if a.key == "prefpipe-report-artifact"]
    assert md and "toy-pairs" in md[0].data and "| pairs (toy-pairs) | 40 |" in md[0].data


def test_bad_run_config_names_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"inputs": {"task": {"n": 0}}}))
    with pytest.raises(InputError, match=r"bad.yaml.*inputs.task.n"):
        load_run_config(p)
    p.write_text(yaml.safe_dump({"inputs": {"task": {}}, "stages": [{"stage": "toy-pairs", "input": "nope"}]}))
    with pytest.raises(InputError, match="not `inputs` or an earlier stage"):
        load_run_config(p)


def test_paired_delta_interval():
    a = [True] * 50 + [False] * 50
    b = [True] * 60 + [False] * 40
    d = paired_delta(a, b, resamples=4000)
    assert d["delta_pp"] == pytest.approx(10.0)
    assert d["ci_low_pp"] > 3.0 and d["ci_high_pp"] < 17.0   # 10 discordant pairs out of 100
    assert paired_delta(a, a)["ci_low_pp"] == 0.0


@pytest.mark.slow
def test_sigkill_during_flow_then_rerun(tmp_path):
    cfg = write_config(tmp_path, "killed", n=120)
    ref_cfg = write_config(tmp_path, "uninterrupted", n=120)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOY_SLEEP": "0.3",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "flows.app", "run", str(cfg)]
    # its own process group: the flow starts a Prefect server of its own, which a SIGKILL of the flow alone
    # would leave running after the suite; killing the group stops both, also when the test fails
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    manifest = tmp_path / "killed/pairs/manifest.json"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert not json.loads(manifest.read_text())["complete"]
    env["TOY_SLEEP"] = "0"
    assert subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, "-m", "flows.app", "run", "--no-prefect", str(ref_cfg)], env=env,
                          cwd=ROOT, capture_output=True).returncode == 0
    for stage in ("pairs", "pairs2"):
        got, ref = _rows(tmp_path / "killed", stage), _rows(tmp_path / "uninterrupted", stage)
        assert got.num_rows == 120 and len(set(got.column("row_key").to_pylist())) == 120
        assert got.equals(ref)


@pytest.mark.parametrize("path", sorted((ROOT / "flows" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_validate(path, monkeypatch):
    """Every bundled run config parses, and each stage's and each training arm's config validates (a typo
    in a field name would otherwise only fail minutes into a run)."""
    from pipeline.stage import get_stage
    from pipeline.train.config import TrainConfig
    from stages.catalog import load_stage_modules

    monkeypatch.delenv("PREFPIPE_STAGE_MODULES", raising=False)
    load_stage_modules()
    cfg, _ = load_run_config(path)
    for step in cfg.stages:
        get_stage(step.stage).config(**step.config)
    for arm in cfg.train:
        TrainConfig(**{"model": cfg.model, **arm.config, "data": arm.data, "output_dir": "unused"})
    assert cfg.stages or cfg.train


def test_verifier_agreement_counts_each_label_kind(tmp_path):
    """The report's verifier check on full-solution pairs: agree / both right / both wrong / inverted."""
    import pyarrow.parquet as pq

    from flows.report import _task_problems, _verifier_agreement
    from flows.steps import prepare_inputs

    cfg, _ = load_run_config(write_config(tmp_path, n=4))
    prompts = pq.read_table(prepare_inputs(cfg, tmp_path)).to_pylist()
    right = [p["gold"] for p in prompts]
    wrong = [g.rsplit("Answer: ", 1)[0] + f"Answer: {int(p['answer']) + 1}" for g, p in zip(right, prompts)]
    rows = [  # (chosen, rejected, shared_prefix, status)
        (right[0], wrong[0], None, "ok"),                      # agree
        (wrong[1], right[1], None, "ok"),                      # inverted
        (right[2], right[2], None, "ok"),                      # both right
        (wrong[3], wrong[3], None, "ok"),                      # both wrong
        (right[0][10:], wrong[0][10:], right[0][:10], "ok"),   # agree, with the solution split at a prefix
        (wrong[1], right[1], None, "filtered"),                # not counted
    ]
    ids = [prompts[i]["prompt_id"] for i in (0, 1, 2, 3, 0, 1)]
    table = pa.table({"prompt_id": ids, "shared_prefix": [r[2] for r in rows], "chosen": [r[0] for r in rows],
                      "rejected": [r[1] for r in rows], "status": [r[3] for r in rows]})
    got = _verifier_agreement(_task_problems(cfg), table)
    assert got == {"agree": 2, "both_right": 1, "both_wrong": 1, "inverted": 1, "n": 5, "agree_share": 0.4}


def _eval_file(path: Path, correct: list[bool], ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "correct": c, "output": ""} for i, c in zip(ids, correct)]
    n = len(rows)
    path.write_text(json.dumps({"accuracy": sum(correct) / n, "ci_low": 0.0, "ci_high": 1.0, "n": n,
                                "correct": sum(correct), "per_problem": rows, "model": "m", "label": path.stem}))


def test_report_compares_with_another_runs_eval(tmp_path):
    """eval.compare_with: an arm of another run enters the paired comparisons (by problem id, whatever the
    order), a file not written yet is listed as missing, and one on other problems is an error naming it."""
    from flows.report import _markdown, build_summary

    ids = [f"p{i}" for i in range(10)]
    other = tmp_path / "other" / "eval" / "naive.json"
    _eval_file(other, [True] * 2 + [False] * 8, ids[::-1])       # 2 right: p9, p8
    cfg_path = write_config(tmp_path, stages=[{"id": "pairs", "stage": "toy-pairs"}],
                            train=[{"name": "arm", "data": "pairs"}],
                            eval={"compare_with": {"other/naive": str(other),
                                                   "other/later": str(tmp_path / "nope.json")}})
    cfg, _ = load_run_config(cfg_path)
    run = Path(cfg.output_dir) / "eval"
    _eval_file(run / "base.json", [True] * 5 + [False] * 5, ids)         # p0-p4 right
    _eval_file(run / "arm.json", [True] * 7 + [False] * 3, ids)          # p0-p6 right
    s = build_summary(cfg)
    d = s["deltas"]["arm vs other/naive"]
    assert d["n"] == 10 and d["delta_pp"] == pytest.approx(50.0)         # 0.7 - 0.2
    by_id = paired_delta([i in ("p8", "p9") for i in ids], [i < "p7" for i in ids])  # paired by id, not order
    assert (d["ci_low_pp"], d["ci_high_pp"]) == (by_id["ci_low_pp"], by_id["ci_high_pp"])
    assert s["deltas"]["arm vs base"]["delta_pp"] == pytest.approx(20.0)
    assert "other/naive vs base" not in s["deltas"]
    assert s["evals"]["other/naive"]["role"] == "other run"
    assert s["compare_missing"] == {"other/later": str(tmp_path / "nope.json")}
    assert "does not exist yet" in _markdown(cfg, s, [], cfg_path)
    _eval_file(other, [True] * 9, ids[:9])                                # one problem short
    with pytest.raises(InputError, match=r"naive\.json.*9 problems are not this run's 10"):
        build_summary(cfg)


def test_report_pools_average_seeds_per_problem(tmp_path):
    """eval.pools: per-problem mean correctness over a pool's models, compared with base and earlier pools;
    a pool naming an unknown model fails at config load; one with an eval missing is listed, not compared."""
    from flows.report import _markdown, build_summary

    ids = [f"p{i}" for i in range(8)]
    arms = [{"name": n, "data": "pairs"} for n in ("a1", "a2", "b1", "b2", "c1")]
    cfg_path = write_config(tmp_path, stages=[{"id": "pairs", "stage": "toy-pairs"}], train=arms,
                            eval={"pools": {"A": ["a1", "a2"], "B": ["b1", "b2"], "C": ["c1", "late"]}})
    with pytest.raises(InputError, match=r"eval pool 'C': \['late'\] not base"):
        load_run_config(cfg_path)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["train"].append({"name": "late", "data": "pairs"})
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg, _ = load_run_config(cfg_path)
    run = Path(cfg.output_dir) / "eval"
    right = {"base": "p0 p1", "a1": "p0 p1 p2", "a2": "p0 p1 p3", "b1": "p0 p1 p2 p3 p4", "b2": "p0 p1 p2 p3",
             "c1": "p0"}
    for name, r in right.items():
        _eval_file(run / f"{name}.json", [i in r.split() for i in ids], ids)
    s = build_summary(cfg)
    assert s["pools"]["A"]["accuracy"] == pytest.approx(3 / 8) and s["pools"]["B"]["accuracy"] == pytest.approx(4.5 / 8)
    a = [1, 1, .5, .5, 0, 0, 0, 0]
    b = [1, 1, 1, 1, .5, 0, 0, 0]
    want = paired_delta(a, b)
    got = s["pool_deltas"]["B vs A"]
    assert got["delta_pp"] == pytest.approx(100 * 1.5 / 8) and got["ci_low_pp"] == want["ci_low_pp"]
    assert s["pool_deltas"]["A vs base"]["delta_pp"] == pytest.approx(100 * 1 / 8)
    assert set(s["pool_deltas"]) == {"A vs base", "B vs base", "B vs A"}
    assert s["pools_missing"] == {"C": ["late"]}
    md = _markdown(cfg, s, [], cfg_path)
    assert "| B vs A | +18.8 |" in md and "Pool `C` not compared: no eval yet for late." in md


def test_rerun_with_changed_inputs_is_refused(tmp_path):
    """inputs/prompts.parquet is written once; a rerun under a changed `inputs` section (here n 6 -> 4) is refused
    instead of silently reusing the 6 prompts every stage was built on; the same config reuses them, and a folder
    from before the record existed keeps its prompts."""
    from flows.steps import prepare_inputs

    cfg, _ = load_run_config(write_config(tmp_path, n=6))
    out = prepare_inputs(cfg, tmp_path)
    assert pq_rows(out) == 6 and prepare_inputs(cfg, tmp_path) == out
    smaller, _ = load_run_config(write_config(tmp_path, n=4))
    with pytest.raises(InputError, match=r"made from another `inputs` section") as e:
        prepare_inputs(smaller, tmp_path)
    assert e.value.column == "inputs" and pq_rows(out) == 6
    (out.parent / "inputs.json").unlink()  # a run folder written before the record: kept as it was
    assert prepare_inputs(smaller, tmp_path) == out and pq_rows(out) == 6


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows
