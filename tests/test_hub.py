"""Hub export: the folder round-trips through `datasets`, the card states the run's numbers, a push to an offline
Hub-compatible server reads back equal rows, and the token never shows up anywhere."""
from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import datetime as dt
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import Field

from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.hub import ExportConfig, PushError, export_run, export_table, push_export
from pipeline.hub_card import redact
from pipeline.stage import StageConfig, StageSpec, get_stage
from pipeline.store import RunStore
from tests.helpers.toy_stage import ToyConfig, prompts
from tests.hub_server import FakeHub

pytestmark = pytest.mark.timeout(300)  # a stuck HTTP exchange fails this module, not the whole suite
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTtoken_9f3c2a7e51d04b8c"
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
N = 23
MARGINS = (0.0, 0.5, 1.0, 2.0)


class HubPairsConfig(StageConfig):
    version: ClassVar[str] = "1"
    verifier: str = Field("exact-answer", description="what labels the pairs (shows in the card)")
    judge_model: str = Field("judge-x", description="judge model id")
    api_key: str | None = Field("sk-config-secret-123", description="a secret that must not reach the card")


def _status(i: int) -> str:
    return "failed" if i % 7 == 3 else "filtered" if i % 11 == 5 else "ok"


def _hub_pairs(rows: pa.Table, cfg: HubPairsConfig, backend, ctx) -> dict[str, pa.Table]:
    """Pairs with varied margins, ties, confidences, models and statuses, plus a ranked-list output."""
    pairs, lists = [], []
    for pid, prompt in zip(rows.column("prompt_id").to_pylist(), rows.column("prompt").to_pylist()):
        i = int(pid.split("-")[-1])
        margin, status = MARGINS[i % 4], _status(i)
        pairs.append({"pair_id": ctx.row_key(pid), "row_key": ctx.row_key(pid), "prompt_id": pid, "prompt": prompt,
                      "shared_prefix": "Step 1:" if i % 2 else None,
                      "chosen": f"Step 1: ok {i}", "rejected": f"Step 1: bad {i}", "stage": "tree",
                      "method": "prism_mcts", "chosen_score": 0.25 + margin, "rejected_score": 0.25,
                      "score_margin": margin, "label_confidence": 0.5 + 0.1 * (i % 5) if i % 2 == 0 else None,
                      "generator_model": "gen-a" if i % 3 else "gen-b",
                      "judge_model": "judge-x" if i % 2 == 0 else None, "created_at": EPOCH,
                      "extra": json.dumps({"task": "arith", "i": i}), "status": status,
                      "error": None if status == "ok" else f"{status} row {i}"})
        k = 2 + i % 3
        lists.append({"prompt_id": pid, "prompt": prompt, "responses": [f"r{j}" for j in range(k)],
                      "scores": [float(k - j) for j in range(k)], "steps": [[f"s{j}"] for j in range(k)],
                      "method": "tpo_tree", "extra": "{}", "row_key": ctx.row_key(pid, 1),
                      "status": "failed" if i % 7 == 3 else "ok", "error": "no tree" if i % 7 == 3 else None})
    return {"main": pa.Table.from_pylist(pairs), "lists": pa.Table.from_pylist(lists),
            "aux": rows.select(["prompt_id", "prompt"])}


HUB_PAIRS = StageSpec("tree-search", HubPairsConfig, _hub_pairs, "prompts",
                      {"main": "pairs", "lists": "lists", "aux": "prompts"}, needs_backend=False)
PROMPTS_ONLY = StageSpec("prompt-copy", StageConfig, lambda rows, cfg, b, ctx: {"main": rows}, "prompts",
                         {"main": "prompts"}, needs_backend=False)


def _run(spec, cfg, run_dir: Path, n: int = N) -> None:
    run_stage(spec, prompts(n), cfg, None, RunStore(run_dir), shard_size=8, fail_threshold=1.0, progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hub") / "run-7"
    _run(HUB_PAIRS, HubPairsConfig(), d)
    _run(get_stage("toy-pairs"), ToyConfig(fail_every=4), d, n=10)
    return d


@pytest.fixture(scope="module")
def export(run_dir: Path, tmp_path_factory):
    return export_run(run_dir, tmp_path_factory.mktemp("out") / "export")


def _ok_rows(run_dir: Path, stage: str, output: str = "main") -> list[dict]:
    return export_table(RunStore(run_dir).stage(stage).read(output)).to_pylist()


PAIR_COLUMNS = ("shared_prefix", "pair_id", "prompt_id", "stage", "method", "pair_type", "generator_model",
                "judge_model", "chosen_score", "rejected_score", "score_margin", "label_confidence",
                "chosen_correct", "rejected_correct", "iteration")


def _expected(run_dir: Path, stage: str, output: str = "main") -> list[dict]:
    """The export rows of a stage output whose generator has no chat template (standard format): the prompt
    text, the responses, provenance and the prompt's conversation; no row_key/status/error/extra/created_at."""
    out = []
    for r in _ok_rows(run_dir, stage, output):
        conv = json.dumps([{"role": "user", "content": r["prompt"]}])
        if output == "lists":
            out.append({"prompt": r["prompt"], "responses": r["responses"], "scores": r["scores"],
                        "steps": r["steps"], "prompt_id": r["prompt_id"], "method": r["method"],
                        "prompt_messages": conv})
            continue
        row = {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        row |= {c: r[c] for c in PAIR_COLUMNS if c in r}
        out.append(row | {"prompt_messages": conv})
    return out


def _load(folder: Path, name: str | None = None):
    """`load_dataset` with a cache of the folder's own (the shared cache is keyed by file metadata, which two
    exports written in the same second can share)."""
    import datasets

    return datasets.load_dataset(str(folder), name=name, cache_dir=str(folder.parent / f".ds-{folder.name}"))


def _as_rows(ds) -> list[dict]:
    return ds.with_format("arrow")[:].to_pylist()


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


# ---- the export folder ---------------------------------------------------------------------------------------
def test_folder_layout_and_counts(run_dir, export):
    files = sorted(str(p.relative_to(export.folder)) for p in export.folder.rglob("*") if p.is_file())
    assert files == [".prefpipe-export.json", "README.md", "data/toy-pairs/train-00000-of-00001.parquet",
                     "data/tree-search-lists/train-00000-of-00001.parquet",
                     "data/tree-search/train-00000-of-00001.parquet"]
    by_name = {c.name: c for c in export.configs}
    # The default config (the pairs config with most rows) comes first, then the rest by name.
    assert [c.name for c in export.configs] == ["tree-search", "toy-pairs", "tree-search-lists"]
    n_failed = sum(_status(i) == "failed" for i in range(N))
    n_filtered = sum(_status(i) == "filtered" for i in range(N))
    assert (n_failed, n_filtered) == (3, 2)  # i = 3, 10, 17 failed; 5, 16 filtered
    assert by_name["tree-search"].status == {"ok": N - 5, "failed": 3, "filtered": 2}
    assert by_name["tree-search"].splits == {"train": N - 5}
    assert by_name["tree-search-lists"].splits == {"train": N - 3}
    assert by_name["toy-pairs"].status == {"ok": 7, "failed": 3}  # p-0, p-4, p-8 fail with fail_every=4
    table = pq.read_table(export.folder / "data/tree-search/train-00000-of-00001.parquet")
    assert not {"row_key", "status", "error", "extra", "created_at"} & set(table.column_names)  # store internals
    assert table.schema.field("stage").type == pa.string()  # dictionaries become plain strings
    # The generator ("gen-a") is no local model, so no chat template is known: standard format, plain prompts.
    assert {c.name: c.format for c in export.configs} == {"tree-search": "standard", "toy-pairs": "standard",
                                                          "tree-search-lists": "standard"}
    listing = json.loads((export.folder / ".prefpipe-export.json").read_text())
    assert listing["files"] == [f for f in files if f != ".prefpipe-export.json"]
    assert listing["configs"]["tree-search"] == {"default": True, "format": "standard", "kind": "pairs",
                                                 "output": "main", "stage": "tree-search"}


def test_load_dataset_folder_round_trip(run_dir, export):
    default = _load(export.folder)
    assert list(default) == ["train"]
    assert _as_rows(default["train"]) == _expected(run_dir, "tree-search")  # 18 ok pairs beat toy-pairs' 7
    for name, stage, output in (("tree-search", "tree-search", "main"), ("tree-search-lists", "tree-search", "lists"),
                                ("toy-pairs", "toy-pairs", "main")):
        ds = _load(export.folder, name)
        assert _as_rows(ds["train"]) == _expected(run_dir, stage, output), name


def test_test_split_is_seeded_and_grouped_by_prompt(run_dir, tmp_path):
    cfg = ExportConfig(test_fraction=0.3, seed=3, rows_per_file=4, stages=["tree-search"])
    res = export_run(run_dir, tmp_path / "a", cfg)
    pairs = next(c for c in res.configs if c.name == "tree-search")
    lists = next(c for c in res.configs if c.name == "tree-search-lists")
    # 20 distinct prompts have an ok row in some config (the lists' 20 cover the pairs' 18): round(0.3 x 20) = 6
    # of them go to test, exactly, in every config alike.
    assert lists.splits == {"train": 14, "test": 6}
    assert pairs.splits["train"] + pairs.splits["test"] == N - 5
    n_train_files = -(-pairs.splits["train"] // 4)
    assert pairs.files["train"] == [f"data/tree-search/train-{i:05d}-of-{n_train_files:05d}.parquet"
                                    for i in range(n_train_files)]
    ds = _load(tmp_path / "a", "tree-search")
    train, test = _as_rows(ds["train"]), _as_rows(ds["test"])
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    assert sorted(train + test, key=lambda r: r["pair_id"]) == sorted(_expected(run_dir, "tree-search"),
                                                                       key=lambda r: r["pair_id"])
    list_test_ids = {pid for f in lists.files["test"]
                     for pid in pq.read_table(tmp_path / "a" / f).column("prompt_id").to_pylist()}
    pair_test_ids = {r["prompt_id"] for r in test}
    assert len(list_test_ids) == 6 and pair_test_ids <= list_test_ids  # the same prompts go to test everywhere
    again = export_run(run_dir, tmp_path / "b", cfg)
    assert next(c for c in again.configs if c.name == "tree-search").splits == pairs.splits
    other = export_run(run_dir, tmp_path / "c", cfg.model_copy(update={"seed": 4}))
    tiny = export_run(run_dir, tmp_path / "d", ExportConfig(test_fraction=0.001, stages=["tree-search"]))
    assert next(c for c in tiny.configs if c.name == "tree-search").splits == {"train": N - 5, "test": 0}
    tiny_ds = _load(tmp_path / "d", "tree-search")
    assert list(tiny_ds) == ["train"] and tiny_ds["train"].num_rows == N - 5  # the empty test split is left out
    assert not list((tmp_path / "d" / "data" / "tree-search").glob("test-*"))
    assert "Empty splits, not declared above (a zero-row file cannot be loaded): `tree-search` test" in \
        tiny.card_path.read_text()
    other_files = next(c for c in other.configs if c.name == "tree-search-lists").files["test"]
    other_test = {pid for f in other_files for pid in pq.read_table(tmp_path / "c" / f).column("prompt_id").to_pylist()}
    assert len(other_test) == 6 and other_test != list_test_ids


@pytest.mark.parametrize("n_prompts", [3, 10, 41])
def test_test_split_holds_the_fraction_to_one_prompt(n_prompts):
    from pipeline.hub import held_out_prompt_ids
    ids = pa.array([f"p-{i}" for i in range(n_prompts) for _ in range(3)])  # 3 rows per prompt
    for fraction in (0.1, 0.2, 0.5):
        for seed in range(5):
            held = held_out_prompt_ids(ids, fraction, seed).to_pylist()
            assert abs(len(held) - fraction * n_prompts) <= 0.5 and len(set(held)) == len(held)


def test_export_is_byte_identical_when_repeated(run_dir, export, tmp_path):
    again = export_run(run_dir, tmp_path / "again")

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}
    assert digest(again.folder) == digest(export.folder)
    with pytest.raises(InputError, match="pass --overwrite"):
        export_run(run_dir, again.folder)
    export_run(run_dir, again.folder, ExportConfig(overwrite=True))  # an earlier export is replaced
    assert digest(again.folder) == digest(export.folder)


# ---- the card ------------------------------------------------------------------------------------------------
def test_card_front_matter(export):
    meta = _front_matter(export.card_path.read_text())
    assert meta["configs"] == [
        {"config_name": "tree-search", "data_files": [{"split": "train", "path": "data/tree-search/train-*"}],
         "default": True},
        {"config_name": "toy-pairs", "data_files": [{"split": "train", "path": "data/toy-pairs/train-*"}]},
        {"config_name": "tree-search-lists",
         "data_files": [{"split": "train", "path": "data/tree-search-lists/train-*"}]}]
    assert meta["license"] == "apache-2.0"
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    assert {"preference", "dpo", "tree-search", "toy-pairs"} <= set(meta["tags"])


def test_card_numbers(run_dir, export):
    card = export.card_path.read_text()
    # Row counts and filter rates of every stage output (rates over all rows the stage wrote).
    assert "| tree-search | main | pairs | 23 | 18 | 3 | 2 | 78.3 % | 13.0 % | 8.7 % |" in card
    assert "| tree-search | lists | lists | 23 | 20 | 3 | 0 | 87.0 % | 13.0 % | 0.0 % |" in card
    assert "| toy-pairs | main | pairs | 10 | 7 | 3 | 0 | 70.0 % | 30.0 % | 0.0 % |" in card
    assert "| tree-search | aux | prompts | 23 | 23 | 0 | 0 |" in card
    # Margins over the exported (ok) rows, computed here from the store independently of the exporter.
    ok = [i for i in range(N) if _status(i) == "ok"]
    margins = [MARGINS[i % 4] for i in ok]
    ties = margins.count(0.0)
    assert ties == 5  # i = 0, 4, 8, 12, 20 (16 is filtered)
    row = (f"| `tree-search` | score_margin | {len(margins)} | {statistics.mean(margins):.4g} | "
           f"{statistics.median(margins):.4g} | 0 | 2 | {ties} ({100 * ties / len(margins):.1f} %) |")
    assert row in card
    conf = [0.5 + 0.1 * (i % 5) for i in ok if i % 2 == 0]
    assert (f"| `tree-search` | label_confidence | {len(conf)} | {statistics.mean(conf):.4g} | "
            f"{statistics.median(conf):.4g} | {min(conf):.4g} | {max(conf):.4g} |") in card
    sizes = [2 + i % 3 for i in range(N) if i % 7 != 3]
    assert (f"| `tree-search-lists` | list_size | {len(sizes)} | {statistics.mean(sizes):.4g} | "
            f"{statistics.median(sizes):.4g} | 2 | 4 |") in card
    # Models from the data.
    gen_b = sum(1 for i in ok if i % 3 == 0)
    assert f"generator models `gen-a` ({len(ok) - gen_b}), `gen-b` ({gen_b})" in card
    assert f"judge models `judge-x` ({len(conf)})" in card
    assert "config `judge_model`: `judge-x`" in card


def test_card_ties_match_store(run_dir, export):
    margins = pc.filter(RunStore(run_dir).stage("tree-search").read().column("score_margin"),
                        pc.equal(RunStore(run_dir).stage("tree-search").read().column("status"), "ok")).to_pylist()
    assert margins.count(0.0) == sum(1 for i in range(N) if _status(i) == "ok" and i % 4 == 0) == 5
    stats = next(c for c in export.configs if c.name == "tree-search").stats["score_margin"]
    assert stats["ties"] == 5 and stats["count"] == len(margins) == 18
    assert stats["mean"] == pytest.approx(statistics.mean(margins))


def test_card_run_config_and_limitations(run_dir, export):
    card = export.card_path.read_text()
    for stage in ("tree-search", "toy-pairs"):
        block = re.search(rf"### {stage}\n\n```yaml\n(.*?)\n```", card, re.S)
        assert block, stage
        manifest = RunStore(run_dir).stage(stage).manifest()
        assert yaml.safe_load(block.group(1)) == redact(manifest["fingerprint_inputs"])
    assert "sk-config-secret-123" not in card and "api_key: <redacted>" in card
    limits = card.split("## Limitations")[1]
    assert "verifier=`exact-answer`" in limits and "judge_model=`judge-x`" in limits
    assert "synthetic multi-step arithmetic" in limits  # the rows' extra says task=arith
    assert "`tree-search`: 3 failed, 2 filtered" in limits and "`toy-pairs`: 3 failed, 0 filtered" in limits
    assert "`tree-search`: 5 of 18 pairs (27.8 %) have a zero score margin" in limits
    odd_ok = sum(1 for i in range(N) if _status(i) == "ok" and i % 2)
    assert f"`tree-search`: {odd_ok / 18:.0%} of pairs share an assistant prefix" in limits


def test_verifier_agreement_from_columns_or_extra():
    from pipeline.hub_card import pair_stats, reduce_pairs
    verdicts = [(True, False), (True, False), (True, True), (False, True), (False, False), (True, None)]
    as_columns = pa.table({"chosen_correct": [c for c, _ in verdicts], "rejected_correct": [r for _, r in verdicts]})
    as_extra = pa.table({"extra": [json.dumps({"chosen_correct": c, "rejected_correct": r, "depth": 2})
                                   for c, r in verdicts]})
    want = {"verified": 5, "agree": 2, "inverted": 1, "both_right": 1, "both_wrong": 1}  # the last pair is unjudged
    assert pair_stats(reduce_pairs(as_columns))["verifier_agreement"] == want
    assert pair_stats(reduce_pairs(as_extra))["verifier_agreement"] == want
    assert pair_stats(reduce_pairs(pa.table({"extra": ["{}", "{}"]})))["verifier_agreement"] is None


def _intervention(rows: pa.Table, cfg, backend, ctx) -> dict[str, pa.Table]:
    out = []
    for pid, prompt in zip(rows.column("prompt_id").to_pylist(), rows.column("prompt").to_pylist()):
        i = int(pid.split("-")[-1])
        out.append({"pair_id": ctx.row_key(pid), "row_key": ctx.row_key(pid), "prompt_id": pid, "prompt": prompt,
                    "shared_prefix": "Step 1: 2\n", "chosen": f"Step 1: 2\nAnswer: {i}",
                    "rejected": "Step 1: 2\nStep 2: 3" if i % 2 else f"Step 1: 2\nAnswer: {i + 1}",
                    "chosen_is_terminal": i % 3 != 0, "rejected_is_terminal": i % 2 == 0, "stage": "intervened",
                    "method": "ipo_math", "generator_model": "gen-a", "created_at": EPOCH, "extra": "{}",
                    "status": "ok", "error": None})
    return {"main": pa.Table.from_pylist(out)}


def test_intervention_corrected_solutions_become_sft_rows(tmp_path):
    """Intervention's chosen sides that end the answer are its corrected solutions; pairs with a non-terminal
    side go to the `-steps` config, the rest stay conversational/standard."""
    d = tmp_path / "run"
    _run(StageSpec("intervention", StageConfig, _intervention, "prompts", {"main": "pairs"}, needs_backend=False),
         StageConfig(), d, n=6)
    res = export_run(d, tmp_path / "out")
    by = {c.name: c for c in res.configs}
    assert {n: (c.format, c.splits["train"]) for n, c in by.items()} == {
        "intervention": ("standard", 2), "intervention-steps": ("step", 4), "intervention-sft": ("messages", 4)}
    sft = _as_rows(_load(res.folder, "intervention-sft")["train"])
    assert {r["prompt_id"]: r["messages"][-1]["content"] for r in sft} == {
        f"p-{i}": f"Step 1: 2\nAnswer: {i}" for i in range(6) if i % 3 != 0}
    assert {r["source"] for r in sft} == {"intervention:corrected"}
    steps = _as_rows(_load(res.folder, "intervention-steps")["train"])
    assert {(r["prompt"], r["chosen"]) for r in steps if r["prompt_id"] == "p-1"} == {
        (prompts(6).column("prompt")[1].as_py() + "Step 1: 2\n", "Answer: 1")}


def test_redact_blanks_secret_keys_only():
    cfg = {"hf_token": "hf_x", "max_tokens": 5, "rollout_max_tokens": 9, "token": "t", "nested":
           {"api_key": "k", "apikey": "k2", "password": "", "auth-token": None, "judge_model": "m"}, "list": [{"secret": 1}]}
    assert redact(cfg) == {"hf_token": "<redacted>", "max_tokens": 5, "rollout_max_tokens": 9, "token": "<redacted>",
                           "nested": {"api_key": "<redacted>", "apikey": "<redacted>", "password": "",
                                      "auth-token": None, "judge_model": "m"}, "list": [{"secret": "<redacted>"}]}


# ---- bad input -----------------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path, run_dir):
    with pytest.raises(InputError, match="run directory does not exist"):
        export_run(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no stages in this run directory"):
        export_run(tmp_path / "empty", tmp_path / "out")
    _run(PROMPTS_ONLY, StageConfig(), tmp_path / "prompts-only", n=5)
    with pytest.raises(InputError, match=r"no stage output holds pairs or ranked lists.*'prompt-copy': \['prompts'\]"):
        export_run(tmp_path / "prompts-only", tmp_path / "out")
    with pytest.raises(InputError, match=r"stage\(s\) \['nope'\] not in the run"):
        export_run(run_dir, tmp_path / "out", ExportConfig(stages=["nope"]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no earlier export"):
        export_run(run_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_overwrite_removes_only_listed_files(run_dir, tmp_path):
    """A cloned dataset repo (its .git, a file the user added) survives a re-export; only the files the earlier
    export listed go, e.g. the stale shards of an export with more files."""
    out = tmp_path / "clone"
    export_run(run_dir, out, ExportConfig(rows_per_file=5, stages=["tree-search"]))
    assert (out / "data/tree-search/train-00003-of-00004.parquet").exists()
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "notes.md").write_text("mine")
    (out / "data" / "tree-search" / "extra.parquet").write_bytes(b"not ours")
    before = _digest(out)
    with pytest.raises(InputError, match="pass --overwrite"):
        export_run(run_dir, out, ExportConfig(stages=["tree-search"]))
    assert _digest(out) == before  # refused before anything was written
    res = export_run(run_dir, out, ExportConfig(stages=["tree-search"], overwrite=True))
    after = _digest(out)
    kept = {k: v for k, v in before.items() if k.startswith(".git/") or k in ("notes.md",
                                                                              "data/tree-search/extra.parquet")}
    assert {k: after[k] for k in kept} == kept
    new_files = {"README.md", ".prefpipe-export.json", *(f for c in res.configs for p in c.files.values() for f in p)}
    assert set(after) == set(kept) | new_files  # the four old shards are gone, nothing else
    assert "data/tree-search/train-00003-of-00004.parquet" not in after


def test_overwrite_refuses_folders_without_a_listing(run_dir, tmp_path):
    """#28: a folder whose README carries the card marker but that prefpipe did not list is not deleted."""
    out = tmp_path / "repo"
    (out / ".git").mkdir(parents=True)
    (out / "README.md").write_text("<!-- written by prefpipe export -->\nold card")
    with pytest.raises(InputError, match="holds no earlier export"):
        export_run(run_dir, out, ExportConfig(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [".git", "README.md"]
    for bad in (["../outside.txt"], ["/etc/passwd"], [".git/HEAD"], "x"):
        (out / ".prefpipe-export.json").write_text(json.dumps({"files": bad, "configs": {}}))
        with pytest.raises(InputError) as err:
            export_run(run_dir, out, ExportConfig(overwrite=True))
        assert ".prefpipe-export.json" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == [".git", ".prefpipe-export.json", "README.md"]


@pytest.mark.parametrize("where, value", [("output", "../../escaped"), ("shard", "/tmp/elsewhere.parquet"),
                                          ("shard", "../../../x.parquet")])
def test_manifest_paths_that_escape_are_refused(run_dir, tmp_path, where, value):
    import shutil
    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("toy-pairs"))
    mpath = d / "tree-search" / "manifest.json"
    m = json.loads(mpath.read_text())
    if where == "output":
        m["outputs"][value] = m["outputs"].pop("lists")
        for shard in m["shards"].values():
            shard["files"][value] = shard["files"].pop("lists")
            shard["rows"][value] = shard["rows"].pop("lists")
        m["summary"]["status"][value] = m["summary"]["status"].pop("lists")
    else:
        m["shards"]["0"]["files"]["main"] = value
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError, match=re.escape(repr(value))) as err:  # the store or the export refuses it
        export_run(d, tmp_path / "out")
    assert "tree-search/manifest.json" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing written


def test_export_path_checks(tmp_path):
    from pipeline.hub_out import check_name, inside
    assert check_name("lists", "output name") == "lists"
    for bad in ("..", "../x", "a/b", ".hidden", "", "/abs"):
        with pytest.raises(InputError, match="is not a plain name"):
            check_name(bad, "output name", file="m.json")
    assert inside(tmp_path, Path("part-00000.parquet"), "shard path") == tmp_path / "part-00000.parquet"
    with pytest.raises(InputError, match="is an absolute path"):
        inside(tmp_path, Path("/etc/passwd"), "shard path")
    with pytest.raises(InputError, match="escapes"):
        inside(tmp_path, Path("a/../../x"), "shard path")


def test_incomplete_stage_needs_flag(tmp_path, run_dir):
    import shutil
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    mpath = d / "toy-pairs" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["complete"], m["summary"] = False, None
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError, match=r"\['toy-pairs'\] have not finished"):
        export_run(d, tmp_path / "out")
    res = export_run(d, tmp_path / "out", ExportConfig(allow_incomplete=True))
    assert next(c for c in res.configs if c.name == "toy-pairs").status == {"ok": 7, "failed": 3}
    assert "was **incomplete**" in res.card_path.read_text()


def test_default_config_option(run_dir, tmp_path):
    res = export_run(run_dir, tmp_path / "o", ExportConfig(default_config="tree-search-lists"))
    assert res.configs[0].name == "tree-search-lists"
    assert _front_matter(res.card_path.read_text())["configs"][0]["default"] is True
    with pytest.raises(InputError, match=r"default config 'nope' is not one of the exported configs"):
        export_run(run_dir, tmp_path / "p", ExportConfig(default_config="nope"))
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))  # the temp build is removed


def test_flow_export_defaults_to_the_treatment_arms_pairs(run_dir, tmp_path):
    """A run config's export: the default config is the first treatment arm's data (toy-pairs, though
    tree-search has more rows); a rerun of the step replaces the flow's own export."""
    import shutil

    from flows.config import RunConfig
    from flows.steps import export_step
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    cfg = RunConfig(output_dir=str(d), inputs={"task": {}}, stages=[
        {"id": "tree-search", "stage": "tree-search"}, {"id": "toy-pairs", "stage": "toy-pairs"}],
        train=[{"name": "base-arm", "data": "tree-search", "role": "baseline"}, {"name": "t", "data": "toy-pairs"}],
        export={"test_fraction": 0.5})
    for _ in range(2):
        folder = export_step(cfg)
        meta = _front_matter((folder / "README.md").read_text())
        assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["toy-pairs"]
    assert _load(folder)["train"].num_rows + _load(folder)["test"].num_rows == 7


def test_cli_option_errors_are_input_errors(tmp_path, run_dir):
    from typer.testing import CliRunner

    from flows.app import app
    r = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "o"), "--test-fraction", "1.5"])
    assert isinstance(r.exception, InputError)
    assert str(r.exception).startswith("--test-fraction: Input should be less than 1")
    r = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "o"), "--format", "chat"])
    assert isinstance(r.exception, InputError)
    assert str(r.exception).startswith("--format: Input should be 'auto', 'conversational' or 'standard'")
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "o"), "--stage", "tree-search"])
    assert r.exit_code == 0, r.output
    assert "tree-search: train 18 rows (5 not ok, left out)" in r.output
    assert "tree-search-lists: train 20 rows (3 not ok, left out)" in r.output
    assert sorted(p.name for p in (tmp_path / "o" / "data").iterdir()) == ["tree-search", "tree-search-lists"]


def test_cli_bad_input_exits_2(tmp_path):
    r = subprocess.run([str(ROOT / ".venv/bin/prefpipe"), "export", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "run directory does not exist" in r.stderr and str(tmp_path / "missing") in r.stderr


# ---- push to the offline Hub ---------------------------------------------------------------------------------
@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub talk to 127.0.0.1 in this test only (conftest sets offline mode for the session)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_push_keeps_folder_and_says_what_to_rerun(export, online):
    before = _digest(export.folder)
    with FakeHub(TOKEN) as hub:
        hub.state.fail_commits = True
        with pytest.raises(PushError) as err:
            push_export(export.folder, "me/prefs", token=TOKEN, endpoint=hub.url)
        msg = str(err.value)
        assert "push to dataset repo me/prefs failed" in msg and "is intact" in msg
        assert f"prefpipe export RUN_DIR --out {export.folder} --repo me/prefs" in msg
        assert TOKEN not in msg
        with pytest.raises(PushError, match="failed") as err:  # a wrong token: 401 from the server
            push_export(export.folder, "me/other", token="hf_wrong_token_000", endpoint=hub.url)
        assert "hf_wrong_token_000" not in str(err.value)
        assert ("me/other" not in {r for _, r in hub.state.repos})
    assert _digest(export.folder) == before


def test_repush_replaces_stale_data_files(run_dir, tmp_path, online):
    small = export_run(run_dir, tmp_path / "e", ExportConfig(rows_per_file=5, stages=["tree-search"]))
    with FakeHub(TOKEN) as hub:
        push_export(small.folder, "me/prefs", token=TOKEN, endpoint=hub.url)
        assert "data/tree-search/train-00003-of-00004.parquet" in hub.files("me/prefs")
        big = export_run(run_dir, tmp_path / "e", ExportConfig(stages=["tree-search"], overwrite=True))
        push_export(big.folder, "me/prefs", token=TOKEN, endpoint=hub.url)
        remote = hub.files("me/prefs")
        with pytest.raises(InputError, match="me/prefs already exists and is public"):
            push_export(big.folder, "me/prefs", private=True, token=TOKEN, endpoint=hub.url)
        assert hub.files("me/prefs") == remote  # nothing was uploaded
    local = {str(p.relative_to(big.folder)): p.read_bytes() for p in big.folder.rglob("*") if p.is_file()}
    assert sorted(remote) == sorted([".gitattributes", *local])
    assert all(remote[k] == v for k, v in local.items())


def test_push_refuses_offline_mode_and_missing_token(export, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        push_export(export.folder, "me/prefs", token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(export.folder.parent / "empty_hf_home" / "token"))
    with pytest.raises(InputError, match="no Hugging Face token: set the environment variable NO_SUCH_TOKEN_VAR"):
        push_export(export.folder, "me/prefs", token_env="NO_SUCH_TOKEN_VAR")
    with pytest.raises(InputError, match="repo id must be USER/NAME"):
        push_export(export.folder, "just-a-name", token=TOKEN)


def test_token_inside_the_folder_is_refused(run_dir, tmp_path, online):
    res = export_run(run_dir, tmp_path / "leak", ExportConfig(extra_limitations=[f"oops {TOKEN}"]))
    with FakeHub(TOKEN) as hub:
        with pytest.raises(PushError, match="README.md contains the Hub token") as err:
            push_export(res.folder, "me/leak", token=TOKEN, endpoint=hub.url)
        assert TOKEN not in str(err.value)
        assert hub.state.requests == []  # nothing was sent


def test_push_then_load_dataset_from_repo(run_dir, tmp_path):
    """The CLI exports and pushes to the fake Hub (debug logging on), then a fresh process loads the repo back."""
    out = tmp_path / "export"
    with FakeHub(TOKEN) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
        env.update({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                    "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"),
                    "HF_DATASETS_CACHE": str(tmp_path / "ds_cache"), "HF_HUB_VERBOSITY": "debug",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "MY_HUB_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)})
        cmd = [str(ROOT / ".venv/bin/prefpipe"), "export", str(run_dir), "--out", str(out), "--repo", "me/prefs",
               "--private", "--token-env", "MY_HUB_TOKEN", "--test-fraction", "0.25"]
        hub.state.fail_commits = True  # first a push that fails at the commit: exit 2, folder kept, rerun named
        failed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "is intact; rerun `prefpipe export " + str(run_dir) + " --out " + str(out) + " --repo me/prefs " \
               "--private --token-env MY_HUB_TOKEN --test-fraction 0.25 --overwrite`" in " ".join(failed.stderr.split())
        assert (out / "README.md").exists()
        hub.state.fail_commits = False
        push = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert push.returncode == 0, push.stderr[-3000:]
        assert "pushed to me/prefs" in push.stdout
        assert sorted(hub.files("me/prefs")) == sorted([".gitattributes"] + [
            str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()])
        assert hub.state.repos[("dataset", "me/prefs")].private
        routes = {(m, re.sub(r"[0-9a-f]{64}", "OID", p)) for m, p, s in hub.state.requests if s < 400}
        assert {("POST", "/api/validate-yaml"), ("POST", "/datasets/me/prefs.git/info/lfs/objects/batch"),
                ("PUT", "/lfs-upload/OID"), ("POST", "/api/datasets/me/prefs/commit/main")} <= routes

        loader = tmp_path / "loaded"
        script = ("import sys, os, datasets\n"
                  "for name in ('tree-search', 'tree-search-lists'):\n"
                  "    ds = datasets.load_dataset('me/prefs', name=name, token=os.environ['MY_HUB_TOKEN'])\n"
                  "    for split in ds:\n"
                  "        ds[split].to_parquet(os.path.join(sys.argv[1], f'{name}-{split}.parquet'))\n"
                  "print('loaded', flush=True)\n")
        loader.mkdir()
        load = subprocess.run([sys.executable, "-c", script, str(loader)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
        assert load.returncode == 0, load.stderr[-3000:]
    for name, output in (("tree-search", "main"), ("tree-search-lists", "lists")):
        local = sorted(_expected(run_dir, "tree-search", output), key=lambda r: r["prompt_id"])
        remote = []
        for split in ("train", "test"):
            remote += pq.read_table(loader / f"{name}-{split}.parquet").to_pylist()
        assert sorted(remote, key=lambda r: r["prompt_id"]) == local, name
    # The token is in no output, no log line, no exported or cached file.
    for text in (failed.stdout, failed.stderr, push.stdout, push.stderr, load.stdout, load.stderr):
        assert TOKEN not in text
    for folder in (out, tmp_path / "hf_home", tmp_path / "ds_cache", loader):
        for p in folder.rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p
