"""Stage 3 (reward-augmented relabeling): golden output, invariants, score sources, errors, resume."""
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

from pipeline.backends.base import Completion, LogprobResult
from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.stage import get_stage
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, make_split
from schemas import validate
from stages.reward_relabel import (RA_TEMPLATE, RewardRelabelConfig, decile_bins, goal_text, parse_judge_score,
                                   render_score)
from tests.helpers.scored_pairs import as_pair_input

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_stage("reward-relabel")
T = "You are an assistant that generates responses for the instruction while implicitly achieving the " \
    "following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: {}."


def golden_input() -> pa.Table:
    raw = pa.table({
        "prompt_id": ["p1", "p2", "p3", "p4"],
        "prompt": ["Say hi.", "Name a color.", "Count to 3.", "Add 2+2."],
        "chosen": ["Hi!", "Blue.", "1 2 3", "4"],
        "rejected": ["Go away.", "Car.", "1 3", "5"],
        "chosen_score": [8.0, 7.5, 9.0, 6.5],
        "rejected_score": [5.0, 7.5, 3.0, 2.0],
        "fine_scores_chosen": [[5.0, 4.0, 5.0, 4.0], None, [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]],
        "fine_scores_rejected": [[2.0, 2.0, 2.0, 2.0], None, [4.0, 4.0, 4.0, 4.0], [3.0, 3.0, 3.0, 3.0]],
    })
    return as_pair_input(raw)


def _run(rows, tmp_path, name="run", backend=None, shard_size=64, fail_threshold=0.01, **cfg):
    res = run_stage(SPEC, rows, RewardRelabelConfig(**cfg), backend, RunStore(tmp_path / name),
                    shard_size=shard_size, progress=False, fail_threshold=fail_threshold)
    return res, res.read()


COLS = ["prompt_id", "system", "chosen", "rejected", "chosen_score", "rejected_score", "score_margin", "goal_score",
        "goal_side", "flipped", "status"]


def test_template_is_the_reference_text_and_scores_render_like_it():
    assert RA_TEMPLATE.format(score="8") == T.format(8)
    assert [render_score(s) for s in (8.0, 10, 7.5, 1.25)] == ["8", "10", "7.5", "1.25"]
    assert goal_text(RewardRelabelConfig(), 6.0).endswith("Overall score: 6.")


def test_golden_input_gives_exactly_these_rows(tmp_path):
    res, out = _run(golden_input(), tmp_path)
    ok = out.filter(pc.equal(out["status"], "ok")).select(COLS).to_pylist()
    assert ok == [
        dict(prompt_id="p1", system=T.format(8), chosen="Hi!", rejected="Go away.", chosen_score=8.0,
             rejected_score=5.0, score_margin=3.0, goal_score=8.0, goal_side="chosen", flipped=False, status="ok"),
        dict(prompt_id="p1", system=T.format(5), chosen="Go away.", rejected="Hi!", chosen_score=5.0,
             rejected_score=8.0, score_margin=-3.0, goal_score=5.0, goal_side="rejected", flipped=True,
             status="ok"),
        dict(prompt_id="p4", system=T.format(6.5), chosen="4", rejected="5", chosen_score=6.5, rejected_score=2.0,
             score_margin=4.5, goal_score=6.5, goal_side="chosen", flipped=False, status="ok"),
        dict(prompt_id="p4", system=T.format(2), chosen="5", rejected="4", chosen_score=2.0, rejected_score=6.5,
             score_margin=-4.5, goal_score=2.0, goal_side="rejected", flipped=True, status="ok"),
    ]
    dropped = out.filter(pc.equal(out["status"], "filtered")).select(["prompt_id", "error"]).to_pylist()
    assert [d["prompt_id"] for d in dropped] == ["p2", "p3"]
    assert dropped[0]["error"].startswith("score tie (7.5)")
    assert dropped[1]["error"].startswith("fine-score filter: mean fine score of chosen 2 < rejected 4")
    assert res.summary["status"]["main"] == {"ok": 4, "filtered": 2}
    src = golden_input()
    assert out["source_pair_id"].to_pylist()[:2] == [src["pair_id"][0].as_py()] * 2
    assert set(out.filter(pc.equal(out["status"], "ok"))["stage"].to_pylist()) == {"reward_aug"}


def test_invariants_on_a_larger_random_input(tmp_path):
    import random
    rng = random.Random(3)
    n = 200
    cs = [float(rng.randint(1, 10)) for _ in range(n)]
    rs = [float(rng.randint(1, 10)) for _ in range(n)]
    raw = pa.table({"prompt_id": [f"q{i}" for i in range(n)], "prompt": [f"question {i}" for i in range(n)],
                    "chosen": [f"good {i}" for i in range(n)], "rejected": [f"bad {i}" for i in range(n)],
                    "chosen_score": cs, "rejected_score": rs})
    _, out = _run(as_pair_input(raw), tmp_path, shard_size=37)
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    n_ties = sum(c == r for c, r in zip(cs, rs))
    assert len(ok) == 2 * (n - n_ties)                        # exactly two rows per kept pair
    assert out.num_rows - len(ok) == n_ties                   # one filtered row per tie
    by_src: dict[str, list] = {}
    for r in ok:
        by_src.setdefault(r["source_pair_id"], []).append(r)
    for a, b in by_src.values():
        assert (a["flipped"], b["flipped"]) == (False, True)
        assert (b["chosen"], b["rejected"]) == (a["rejected"], a["chosen"])
        assert a["goal_score"] == a["chosen_score"] and b["goal_score"] == b["chosen_score"] == a["rejected_score"]
        assert a["system"] == T.format(render_score(a["goal_score"]))
        assert a["system"] != b["system"]                       # no contradictory pair under one system prompt
    keyed = {(r["system"], r["chosen"], r["rejected"]) for r in ok}
    assert not any((s, rj, c) in keyed for s, c, rj in keyed)  # no (x, y1 > y2) and (x, y2 > y1)


def test_ties_kept_when_asked_give_contradictory_rows(tmp_path):
    _, out = _run(golden_input(), tmp_path, drop_score_ties=False, filter_fine_scores=False)
    assert out.num_rows == 8 and set(out["status"].to_pylist()) == {"ok"}
    tie = [r for r in out.to_pylist() if r["prompt_id"] == "p2"]
    assert tie[0]["system"] == tie[1]["system"] and tie[0]["chosen"] == tie[1]["rejected"]


def test_prepend_mode_puts_the_goal_in_front_of_the_prompt(tmp_path):
    _, out = _run(golden_input(), tmp_path, system_mode="prepend")
    r = out.to_pylist()[1]
    assert r["system"] is None and r["prompt"] == T.format(5) + "\n\nSay hi."


def test_prompt_messages_get_a_system_message(tmp_path):
    rows = golden_input()
    msgs = [json.dumps([{"role": "user", "content": p}]) for p in rows["prompt"].to_pylist()]
    rows = rows.append_column("prompt_messages", pa.array(msgs))
    _, out = _run(rows, tmp_path)
    m = json.loads(out["prompt_messages"][0].as_py())
    assert m == [{"role": "system", "content": T.format(8)}, {"role": "user", "content": "Say hi."}]


def test_verifier_scores_on_the_bundled_task(tmp_path):
    probs = make_split(TaskConfig.tiny(), "train", 3)
    wrong = [p.gold_solution.replace(f"Answer: {p.answer}", f"Answer: {p.answer + 1}") for p in probs]
    raw = pa.table({"prompt_id": [p.id for p in probs], "prompt": [p.question for p in probs],
                    "chosen": [p.gold_solution for p in probs], "rejected": wrong,
                    "meta": [p.meta_json() for p in probs]})
    _, out = _run(as_pair_input(raw), tmp_path, score_source="verifier")
    assert out.num_rows == 6
    assert out["chosen_score"].to_pylist() == [10.0, 1.0] * 3
    _, steps = _run(as_pair_input(raw), tmp_path, "steps", score_source="verifier", verifier_mode="steps")
    # answer line wrong = check n+1 of n+1: partial credit 1 + 9 * n/(n+1)
    n = probs[0].n_steps
    assert steps["rejected_score"][0].as_py() == pytest.approx(1 + 9 * n / (n + 1), abs=1e-3)


class FakeJudge:
    model_id, weights_hash = "fake-judge", "0"

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling=None, n=None):
        self.calls += 1
        out = []
        for p in prompts:
            resp = p.split("Response:\n")[1].split("\n\nReply")[0]
            text = "no idea" if resp == "Car." else f"Score: {min(10, len(resp))}"
            out.append([Completion(text=text, finish_reason="stop")])
        return out

    def logprobs(self, prompts, completions):
        return [LogprobResult(total=-float(len(c)), per_token=[-1.0] * max(1, len(c) // 2), token_ids=[])
                for c in completions]


def test_judge_scores_one_batched_call_and_parse_failures_fail_the_row(tmp_path):
    judge = FakeJudge()
    res, out = _run(golden_input(), tmp_path, backend=judge, score_source="judge", filter_fine_scores=False,
                    fail_threshold=0.5)
    assert judge.calls == 1
    rows = {(r["prompt_id"], r["flipped"]): r for r in out.to_pylist()}
    assert rows[("p1", False)]["chosen_score"] == 3.0 and rows[("p1", False)]["rejected_score"] == 8.0
    assert rows[("p2", None)]["status"] == "failed" and "rejected" in rows[("p2", None)]["error"]
    assert [parse_judge_score(t) for t in ("Score: 7", "score = 3.5 then Score: 11", "x")] == [7.0, None, None]


def test_logprob_source_bins_into_deciles(tmp_path):
    assert decile_bins([float(i) for i in range(20)]) == [1 + i // 2 for i in range(20)]
    assert decile_bins([1.0, 1.0, 2.0, 3.0]) == [1, 1, 6, 8]
    _, out = _run(golden_input(), tmp_path, backend=FakeJudge(), score_source="logprob", filter_fine_scores=False)
    assert set(out["goal_score"].drop_null().to_pylist()) <= {float(i) for i in range(1, 11)}


def test_malformed_input_is_rejected_with_a_clear_error(tmp_path):
    rows = golden_input()
    bad = rows.set_column(rows.schema.get_field_index("chosen_score"), "chosen_score",
                          pa.array([8.0, None, 9.0, 6.5]))
    with pytest.raises(InputError, match=r"column 'chosen_score'.*non-null 'chosen_score'"):
        _run(bad, tmp_path)
    with pytest.raises(InputError, match=r"column 'chosen'.*missing required column"):
        _run(rows.drop_columns(["chosen"]), tmp_path, "b")
    with pytest.raises(InputError, match=r"column 'meta'"):
        _run(rows, tmp_path, "c", score_source="verifier")
    with pytest.raises(InputError, match="score_model"):
        _run(rows, tmp_path, "d", score_source="judge")
    with pytest.raises(Exception, match=r"\{score\}"):
        RewardRelabelConfig(template="no placeholder")


CHILD = """
import sys, time
import pyarrow as pa
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
from stages.reward_relabel import RewardRelabelConfig
from tests.helpers.scored_pairs import as_pair_input
n = 90
raw = pa.table({"prompt_id": [f"q{i}" for i in range(n)], "prompt": [f"question {i}" for i in range(n)],
                "chosen": [f"good {i}" for i in range(n)], "rejected": [f"bad {i}" for i in range(n)],
                "chosen_score": [float(i % 6 + 4) for i in range(n)],
                "rejected_score": [float(i % 3 + 1) for i in range(n)]})  # on the template's 1-10, no ties
rows = as_pair_input(raw)
rows = rows.set_column(rows.schema.get_field_index("created_at"), "created_at",
                       pa.array([0] * n, pa.timestamp("us", tz="UTC")))
slow = float(sys.argv[2])
run_stage(get_stage("reward-relabel"), rows, RewardRelabelConfig(), None, RunStore(sys.argv[1]), shard_size=10,
          progress=False, on_shard=lambda i: time.sleep(slow))
"""


def _child(code, run_dir, slow):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(slow)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_and_resume(tmp_path, stage: str, code: str, n_shards: int, timeout: float = 120) -> pa.Table:
    """Run `code` (argv: run dir, seconds to sleep after each shard) to the end once; run it again, SIGKILL it
    after 3 shards, rerun it; the resumed output must equal the uninterrupted one (created_at aside), with
    unique row keys. Returns the resumed table."""
    ref = _child(code, tmp_path / "ref", 0)
    assert ref.wait(timeout=timeout) == 0, ref.stderr.read().decode()
    p = _child(code, tmp_path / "run", 0.5)
    manifest = tmp_path / f"run/{stage}/manifest.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert 3 <= len(json.loads(manifest.read_text())["shards"]) < n_shards
    again = _child(code, tmp_path / "run", 0)
    assert again.wait(timeout=timeout) == 0, again.stderr.read().decode()
    a = RunStore(tmp_path / "run").stage(stage).read().drop_columns(["created_at"])
    b = RunStore(tmp_path / "ref").stage(stage).read().drop_columns(["created_at"])
    assert a.num_rows == b.num_rows and len(pc.unique(a["row_key"])) == a.num_rows
    assert a.equals(b)
    return a


def test_sigkill_then_resume_has_no_duplicates(tmp_path):
    a = kill_and_resume(tmp_path, "reward-relabel", CHILD, n_shards=9)
    assert a.num_rows == 180
    validate(a.append_column("created_at", pa.array([0] * 180, pa.timestamp("us", tz="UTC"))), "pairs")
