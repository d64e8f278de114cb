"""Stage 2 (rationales): golden outputs, A/B order, parse checks, retries, batching, resume, malformed input.

Most tests use `ScriptedBackend`, a fake backend that returns canned texts chosen by a function of the prompt
(allowed for unit tests of parsing and pairing logic); one test runs the real transformers backend on the
tiny random Llama fixture, and a slow test measures the parse rate with SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.helpers.kill_child import child_runner
from pydantic import ValidationError

from pipeline.backends.base import Completion, LogprobResult, SamplingParams, as_messages
from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.stage import StageContext, get_stage
from pipeline.store import RunStore
from stages import rationales as R
from stages._common import now_utc, pair_id
from tests.helpers.report import parse_report

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_stage("rationales")


class ScriptedBackend:
    """A fake Backend for unit tests: `reply(prompt_text, prefix, sampling) -> str` decides every output.

    It records each call (primitive and batch size) so tests can check that stages batch across rows.
    `score(prompt_text, completion) -> float` gives the total log-prob for `logprobs`.
    """

    model_id = "scripted"
    weights_hash = "none"

    def __init__(self, reply, score=None):
        self.reply, self.score, self.calls = reply, score, []

    @staticmethod
    def text_of(prompt) -> str:
        return "\n".join(m["content"] for m in as_messages(prompt))

    def _out(self, prompts, prefixes, sampling, n):
        sampling = sampling or SamplingParams()
        return [[Completion(text=self.reply(self.text_of(p), pre, sampling), finish_reason="stop")
                 for _ in range(n or 1)] for p, pre in zip(prompts, prefixes)]

    def generate(self, prompts, sampling=None, n=None):
        self.calls.append(("generate", len(prompts)))
        return self._out(prompts, [None] * len(prompts), sampling, n)

    def continue_(self, prompts, assistant_prefixes, sampling=None, n=None):
        self.calls.append(("continue_", len(prompts)))
        return self._out(prompts, assistant_prefixes, sampling, n)

    def logprobs(self, prompts, completions):
        self.calls.append(("logprobs", len(prompts)))
        return [LogprobResult(total=self.score(self.text_of(p), c), per_token=[], token_ids=[])
                for p, c in zip(prompts, completions)]

    def close(self):
        pass


def make_pairs(n: int, start: int = 0) -> pa.Table:
    rows = []
    for i in range(start, start + n):
        chosen, rejected = f"The answer is {i + 2} because {i} plus two is {i + 2}.", f"I think it is {i * 7}."
        rows.append({"pair_id": f"in-{i}", "prompt_id": f"q-{i}", "prompt": f"What is {i} plus two?",
                     "chosen": chosen, "rejected": rejected, "stage": "tree", "method": "prism_mcts",
                     "generator_model": "gen", "created_at": now_utc(), "extra": json.dumps({"depth": 3}),
                     "row_key": f"rk-{i}", "status": "ok"})
    return pa.Table.from_pylist(rows)


def good_reply(prompt: str, prefix, sp) -> str:
    if prefix:
        return " it gives the right sum and shows the step."
    pref = re.search(r"Response (\w) is better[.]", prompt).group(1)
    return f"Response {pref} is better: it gives the right sum."


def ctx(seed: int = 0) -> StageContext:
    return StageContext(fingerprint="f" * 64, shard_index=0, seed=seed)


def run_direct(pairs: pa.Table, backend, **cfg) -> pa.Table:
    from schemas import validate
    cfg.setdefault("lead", R.LEAD)  # these tests check the lead path; the default writes freely (test_judges_stages)
    return validate(R.run(validate(pairs, "pairs"), R.RationaleConfig(**cfg), backend, ctx())["main"], "pairs")


# ------------------------------------------------------------------------------------- _judge helpers
@pytest.mark.parametrize("text,want", [
    ("Response B is better because it gives a clear and concise explanation.", {"A": 0, "B": 1}),
    ("Response A is better because it is not confusing.", {"A": 1, "B": 0}),   # negation in the reason
    ("Response A is better than Response B.", {"A": 1, "B": -1}),
    ("Response B is worse than response A.", {"A": 1, "B": -1}),
    ("In contrast, Response A only provides a single tip.", {"A": -1, "B": 0}),
    ("Response B isn't helpful.", {"A": 0, "B": -1}),
    ("A is the better answer. B is wrong.", {"A": 1, "B": -1}),
    ("A good answer is better. The answer is 21.", {"A": 0, "B": 0}),       # an article is not a label
    ("Response A is precise, while response B is concise.", {"A": 0, "B": 0}),   # two labels, no "than"
])
def test_stance_scores(text, want):
    from stages._judge import stance_scores
    assert stance_scores(text) == want


def test_text_helpers():
    from stages._judge import dedupe_repeats, is_refusal, ngram_copy_ratio, parse_bullets
    assert dedupe_repeats("Dress Smart:\n\nDress Smart:\n\nDress Smart:") == ("Dress Smart:", 2)
    assert dedupe_repeats("It is good. It is good. Also fast.") == ("It is good. Also fast.", 1)
    assert parse_bullets("- one thing here\n2. second item ok\n- one thing here\nx\n(3) third one") == \
        ["one thing here", "second item ok", "third one"]
    assert ngram_copy_ratio("a b c d e", ["x a b c d y"]) == 0.5     # 1 of the 2 4-grams is copied
    assert ngram_copy_ratio("a b", ["a b"]) == 0.0                   # no 4-gram at all
    assert is_refusal("I'm sorry, but I can't do that.") and not is_refusal("Sorry to hear that; here is how.")


# ------------------------------------------------------------------------------------------- golden
def test_golden_rows_order_lead_and_training_prompt():
    be = ScriptedBackend(good_reply)
    out = run_direct(make_pairs(6), be)
    assert be.calls == [("continue_", 6)]                     # one batched call for the whole shard
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 6
    for r, src in zip(rows, make_pairs(6).to_pylist()):
        pref = "A" if r["rationale_order"] == "chosen_first" else "B"
        assert r["rationale"] == f"Response {pref} is better because it gives the right sum and shows the step."
        assert r["rationale_stance"] == "preferred" and r["rationale_valid"] and r["rationale_attempts"] == 1
        first, second = (src["chosen"], src["rejected"]) if pref == "A" else (src["rejected"], src["chosen"])
        assert r["rationale_prompt"] == (f"Given the prompt:\n{src['prompt']}\nWhich of the following "
                                         "assistant's responses is more preferable and strictly follows the "
                                         f"prompt question?\nResponse A: \"{first}\"\nor\nResponse B: "
                                         f"\"{second}\"?")
        assert r["pair_id"] == pair_id("rationale", src["prompt_id"], src["chosen"], src["rejected"])
        assert (r["stage"], r["method"], r["rationale_style"]) == ("rationale", "rdpo_general", "general")
        assert (r["chosen"], r["rejected"]) == (src["chosen"], src["rejected"])   # labels never move
        assert r["rationale_template_id"] == R.RationaleConfig().template_id
        assert re.fullmatch(r"rdpo-general-[0-9a-f]{8}", r["rationale_template_id"])
        extra = json.loads(r["extra"])
        assert extra == {"depth": 3, "source_pair_id": src["pair_id"], "source_stage": "tree",
                         "source_method": "prism_mcts", "rationale_order_mode": "random",
                         "preferred_label": pref}


def test_order_is_random_per_pair_seeded_and_reproducible():
    pairs = make_pairs(400)
    a = run_direct(pairs, ScriptedBackend(good_reply))
    b = run_direct(pairs, ScriptedBackend(good_reply))
    orders = a.column("rationale_order").to_pylist()
    assert orders == b.column("rationale_order").to_pylist()
    n_first = orders.count("chosen_first")
    assert 160 <= n_first <= 240                              # Binomial(400, .5): +-4 sd
    # The per-pair draw does not depend on the shard: the same pair alone gets the same order.
    alone = run_direct(pairs.slice(123, 1), ScriptedBackend(good_reply))
    assert alone.column("rationale_order")[0].as_py() == orders[123]


def test_prompt_shows_the_pair_in_the_recorded_order():
    seen = {}

    def reply(prompt, prefix, sp):
        seen[prompt.split("\n")[0]] = (prompt, prefix)
        return " it is right."
    out = run_direct(make_pairs(20), ScriptedBackend(reply)).to_pylist()
    for r in out:
        prompt, prefix = seen[f"Question: {r['prompt']}"]
        a = prompt.split("Response A: ")[1].split("\n\nResponse B: ")[0]
        pref = "A" if r["rationale_order"] == "chosen_first" else "B"
        assert a == (r["chosen"] if pref == "A" else r["rejected"])
        assert prompt.endswith(f"Response {pref} is better. In one or two sentences, explain at a high level "
                               f"why Response {pref} is better than Response {'B' if pref == 'A' else 'A'}.")
        assert prefix == f"Response {pref} is better because"


def test_chosen_first_mode_reproduces_reference_layout():
    out = run_direct(make_pairs(10), ScriptedBackend(good_reply), order="chosen_first")
    assert set(out.column("rationale_order").to_pylist()) == {"chosen_first"}
    assert all(r.startswith("Response A is better") for r in out.column("rationale").to_pylist())


def test_free_generation_without_lead_and_specific_style():
    def reply(prompt, prefix, sp):
        assert prefix is None and sp.max_tokens == 512 and sp.stop == []
        pref = re.search(r"Response (\w) is better\. Explain in detail", prompt).group(1)
        return f"Response {pref} is better than the other one. It shows the sum step by step."
    be = ScriptedBackend(reply)
    out = run_direct(make_pairs(5), be, lead="", style="specific")
    assert be.calls == [("generate", 5)]
    assert out.column("status").to_pylist() == ["ok"] * 5
    assert set(out.column("method").to_pylist()) == {"rdpo_specific"}


# ------------------------------------------------------------------------------------ parse checks
SCRIPT = {   # pair index -> (first attempt, retry)
    0: (" it adds correctly.", None),
    1: ("", " it adds correctly and clearly."),             # empty, then fixed by the retry
    2: (" I'm sorry, I cannot help with that.", " I'm sorry, I cannot help with that."),
    3: ("COPY", "COPY"),                                      # echoes the chosen response
    4: (" it is.\n", " ok"),                                  # too short twice
    5: ("OTHER", "OTHER"),                                    # argues for the rejected response
    6: (" x. x. x. x. x.", " x. x."),                         # a loop, cleaned to "x." -> too short
}


def scripted_reply(prompt, prefix, sp):
    i = int(re.search(r"What is (\d+) plus two", prompt).group(1))
    first, retry = SCRIPT[i]
    text = first if sp.temperature == 0 else (retry if retry is not None else first)
    if text == "COPY":
        return " " + f"The answer is {i + 2} because {i} plus two is {i + 2}."
    if text == "OTHER":
        other = "B" if prefix.startswith("Response A") else "A"
        return f" it is short. But Response {other} is better than it because it is correct."
    return text


def test_parse_failures_are_filtered_with_categories_and_counted():
    be = ScriptedBackend(scripted_reply)
    out = run_direct(make_pairs(7), be)
    assert be.calls == [("continue_", 7), ("continue_", 6)]   # the retry batches only the failed rows
    rows = out.to_pylist()
    cats = [r["error"].split(":")[0] if r["error"] else None for r in rows]
    assert cats == [None, None, "refusal", "echo", "too_short", "label_mismatch", "too_short"]
    assert [r["status"] for r in rows] == ["ok", "ok"] + ["filtered"] * 5
    assert [r["rationale_attempts"] for r in rows] == [1, 2, 2, 2, 2, 2, 2]
    assert rows[5]["rationale_stance"] == "tied" and rows[0]["rationale_stance"] == "preferred"
    assert "the rationale argues for both responses equally" in rows[5]["error"]
    assert rows[3]["error"].startswith("echo: 1.00 of its 4-grams copy the input")
    assert [r["rationale_valid"] for r in rows] == [True, True] + [False] * 5
    rep = parse_report(out)
    assert rep == {"rows": 7, "status": {"ok": 2, "filtered": 5}, "ok_rate": 2 / 7,
                   "errors": {"refusal": 1, "echo": 1, "too_short": 2, "label_mismatch": 1}}


def test_rejected_side_argued_for_is_a_mismatch():
    def reply(prompt, prefix, sp):
        other = "B" if prefix.startswith("Response A") else "A"
        return f" it is long.\nResponse {other} is better. Response {other} is correct and clear."
    out = run_direct(make_pairs(3), ScriptedBackend(reply), max_attempts=1)
    assert out.column("rationale_stance").to_pylist() == ["other"] * 3
    assert all(e.startswith("label_mismatch: the rationale argues for Response")
               for e in out.column("error").to_pylist())


def test_non_ok_input_rows_pass_through_as_filtered():
    pairs = make_pairs(4)
    pairs = pairs.set_column(pairs.schema.get_field_index("status"), "status",
                             pa.array(["ok", "failed", "ok", "filtered"]))
    be = ScriptedBackend(good_reply)
    out = run_direct(pairs, be)
    assert be.calls == [("continue_", 2)]
    assert out.column("status").to_pylist() == ["ok", "filtered", "ok", "filtered"]
    assert out.column("error").to_pylist()[1] == "input_status: input row has status 'failed'"
    assert out.column("rationale").to_pylist()[1] is None


def test_duplicate_input_pairs_keep_unique_ids():
    dup = make_pairs(1).set_column(0, "pair_id", pa.array(["dup"]))  # same pair under another id and row_key
    dup = dup.set_column(dup.schema.get_field_index("row_key"), "row_key", pa.array(["rk-dup"]))
    pairs = pa.concat_tables([make_pairs(2), dup])
    out = run_direct(pairs, ScriptedBackend(good_reply))
    assert out.column("status").to_pylist() == ["ok", "ok", "filtered"]
    assert out.column("error")[2].as_py() == "duplicate: same pair as pair_id 'in-0'"
    assert len(pc.unique(out.column("pair_id"))) == 3


# ------------------------------------------------------------------------------------ malformed input
def test_empty_response_text_is_an_input_error_naming_the_column():
    pairs = make_pairs(3)
    pairs = pairs.set_column(pairs.schema.get_field_index("rejected"), "rejected", pa.array(["x", " ", "y"]))
    with pytest.raises(InputError, match=r"row 1, column 'rejected': empty rejected text.*'in-1'"):
        run_direct(pairs, ScriptedBackend(good_reply))


def test_missing_column_is_rejected_by_the_engine(tmp_path):
    pairs = make_pairs(3).drop_columns(["chosen"])
    with pytest.raises(InputError, match=r"column 'chosen': missing required column"):
        run_stage(SPEC, pairs, R.RationaleConfig(), ScriptedBackend(good_reply), RunStore(tmp_path),
                  progress=False)


def test_bad_config_is_rejected():
    with pytest.raises(ValidationError, match=r"general_template must contain \['\{b\}'\]"):
        R.RationaleConfig(general_template="{prompt} {a} {preferred}")
    with pytest.raises(ValidationError):
        R.RationaleConfig(order="rejected_first")


# ------------------------------------------------------------------------------------ engine + resume
def _strip_time(t: pa.Table) -> pa.Table:
    return t.drop_columns(["created_at"])


def test_engine_run_and_rerun_skip(tmp_path):
    be = ScriptedBackend(good_reply)
    res = run_stage(SPEC, make_pairs(10), R.RationaleConfig(), be, RunStore(tmp_path), shard_size=4,
                    progress=False)
    assert res.summary["status"]["main"] == {"ok": 10} and len(be.calls) == 3
    run_stage(SPEC, make_pairs(10), R.RationaleConfig(), be, RunStore(tmp_path), shard_size=4, progress=False)
    assert len(be.calls) == 3                                  # nothing recomputed


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pipeline.engine import run_stage
    from pipeline.stage import get_stage
    from pipeline.store import RunStore
    from stages.rationales import RationaleConfig
    from tests.test_rationales import ScriptedBackend, good_reply, make_pairs
    kill_after = int(sys.argv[2])
    def on_shard(i):
        if kill_after and i + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    run_stage(get_stage("rationales"), make_pairs(23), RationaleConfig(), ScriptedBackend(good_reply),
              RunStore(sys.argv[1]), shard_size=5, progress=False, on_shard=on_shard)
""")


def test_sigkill_then_rerun_has_no_duplicates(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = child_runner(script)
    ref = child(tmp_path / "ref", 0)
    assert ref.returncode == 0, ref.stderr
    killed = child(tmp_path / "run", 2)
    assert killed.returncode == -signal.SIGKILL
    manifest = json.loads((tmp_path / "run/rationales/manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    again = child(tmp_path / "run", 0)
    assert again.returncode == 0, again.stderr
    got = RunStore(tmp_path / "run").stage("rationales").read()
    want = RunStore(tmp_path / "ref").stage("rationales").read()
    assert got.num_rows == 23 and len(pc.unique(got.column("row_key"))) == 23
    assert _strip_time(got).equals(_strip_time(want))


# ---------------------------------------------------------------------------------- real backends
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from pipeline.backends.fixtures import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def test_tiny_random_model_end_to_end_counts_every_row(tiny_llama, tmp_path):
    import torch

    from pipeline.backends import make_backend
    torch.set_num_threads(1)
    be = make_backend("transformers", str(tiny_llama))
    cfg = R.RationaleConfig(max_tokens=12, max_attempts=2, lead=R.LEAD)
    res = run_stage(SPEC, make_pairs(6), cfg, be, RunStore(tmp_path), shard_size=6, progress=False)
    out = res.read()
    rep = parse_report(out)
    assert rep["rows"] == 6 and sum(rep["status"].values()) == 6
    assert sum(rep["errors"].values()) == rep["status"].get("filtered", 0)   # every rejection has a category
    assert set(rep["errors"]) <= {"empty", "too_short", "refusal", "echo", "label_mismatch"}
    assert out.column("rationale_model").to_pylist() == [str(tiny_llama)] * 6
    assert all(t is None or t.startswith("Response ") for t in out.column("rationale").to_pylist())


def test_cli_malformed_pairs_file_exits_2(tiny_llama, tmp_path):
    import pyarrow.parquet as pq
    bad = tmp_path / "pairs.parquet"
    pairs = make_pairs(2)
    pq.write_table(pairs.set_column(pairs.schema.get_field_index("rejected"), "rejected", pa.array(["x", None])),
                   bad)
    r = subprocess.run([sys.executable, "-m", "flows.app", "stage", "rationales", "-i", str(bad), "-o",
                        str(tmp_path / "run"), "--model", str(tiny_llama)],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "row 1, column 'rejected': null in a required column" in r.stderr + r.stdout


PAIR_SUFFIX_BAD = " Answer in one short sentence that is off-topic and unhelpful."


def smollm2_pairs(backend, n: int) -> pa.Table:
    """Pairs from the bundled general prompts: chosen = SmolLM2's greedy answer, rejected = its answer when
    told to be off-topic (one batched call for both sides)."""
    from pipeline.tasks.loaders import load_prompts
    prompts = load_prompts(ROOT / "data/prompts/general.jsonl").slice(0, n).to_pylist()
    texts = [p["prompt"] for p in prompts] + [p["prompt"] + PAIR_SUFFIX_BAD for p in prompts]
    outs = backend.generate(texts, SamplingParams(temperature=0, max_tokens=40), n=1)
    rows = []
    for i, p in enumerate(prompts):
        c, r = outs[i][0].text.strip(), outs[n + i][0].text.strip()
        rows.append({"pair_id": f"smol-{p['prompt_id']}", "prompt_id": p["prompt_id"], "prompt": p["prompt"],
                     "chosen": c, "rejected": r if r != c else r + " (2)", "stage": "synthetic",
                     "method": "smollm2_pairs", "generator_model": "smollm2-135m", "created_at": now_utc(),
                     "extra": "{}", "row_key": f"smol-{i}", "status": "ok"})
    return pa.Table.from_pylist(rows)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smollm2_rationale_parse_rate(tmp_path):
    """Parse rate of rationales written by SmolLM2-135M-Instruct for 20 pairs (goal >= 90 %); prints the
    report (run with -s to see it)."""
    import time

    import torch

    pytest.importorskip("gguf")
    from pipeline.backends import make_backend
    torch.set_num_threads(1)
    be = make_backend("transformers", "smollm2-135m")
    pairs = smollm2_pairs(be, 20)
    t0 = time.time()
    # With the lead (the verdict written for the model): format only. Without it SmolLM2 argues for the preferred
    # side by name in 6 of 20 (label_mismatch 13, echo 1; docs/judges.md).
    res = run_stage(SPEC, pairs, R.RationaleConfig(max_tokens=48, lead=R.LEAD), be, RunStore(tmp_path), shard_size=20,
                    progress=False, fail_threshold=1.0)
    rep = parse_report(res.read())
    rep["attempts"] = res.read().column("rationale_attempts").to_pylist()
    rep["seconds"] = round(time.time() - t0, 1)
    print("SMOLLM2 RATIONALES", json.dumps(rep))
    from tests.test_deliberation import keep_report
    keep_report("rationales", rep, {"pairs": res.read()})
    assert rep["rows"] == 20
    assert rep["ok_rate"] >= 0.9, rep
