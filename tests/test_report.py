"""The run report on a fabricated run folder: the three opening sentences, summary.json's headline comparisons,
which plots are drawn, and the numbers the plots are drawn from."""
import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from flows.config import load_run_config
from flows.report import _nll_coefs, _tree_arrays, _tree_stats, paired_delta, write_report
from flows.report_plots import preference_loss, smooth, varying_margins

IDS = [f"p{i:02d}" for i in range(20)]
RIGHT = {"base": range(10),                         # 50 %
         "tree-rpo": range(18),                     # 90 %: +40 over base
         "final-answer-rpo": range(14),             # 70 %: tree-rpo +20 over it
         "nll-control": range(1, 19)}               # 90 %: right on p18, wrong on p00, so exactly 0 vs tree-rpo


def _eval(path: Path, right) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    correct = [i in right for i in range(len(IDS))]
    path.write_text(json.dumps({"accuracy": sum(correct) / len(IDS), "ci_low": 0.3, "ci_high": 0.95,
                                "n": len(IDS), "correct": sum(correct), "model": "m", "label": path.stem,
                                "per_problem": [{"id": i, "correct": c, "output": ""} for i, c in zip(IDS, correct)]}))


def _run(tmp_path, arms=("tree-rpo", "final-answer-rpo", "nll-control")) -> Path:
    roles = {"tree-rpo": "treatment", "final-answer-rpo": "baseline", "nll-control": "control"}
    rpo = {"loss": {"loss_type": "sigmoid", "beta": 1.0, "rpo_alpha": 1.0}, "max_steps": 4}
    cfg = {"name": "fab", "output_dir": str(tmp_path / "run"),
           "inputs": {"task": {"preset": "tiny", "split": "train", "n": 4}},
           "stages": [{"id": "tree", "stage": "tree-search"}],
           "train": [{"name": a, "role": roles[a], "data": "tree",
                      "config": rpo if a != "nll-control" else {**rpo, "loss": {"loss_type": "sft"}}} for a in arms],
           "eval": {"task": {"split": "eval", "n": 20}}, "report": True}
    path = tmp_path / "fab.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    for label in ("base", *arms):
        _eval(run / "eval" / f"{label}.json", RIGHT[label])
    for a in arms:
        (run / "train" / a).mkdir(parents=True)
        (run / "train" / a / "train_summary.json").write_text(json.dumps({"steps": 4, "groups": 64}))
        rows = [{"step": i + 1, "loss": 0.7 - 0.1 * i, "nll": 0.05, "rewards/margins": 0.1 * i,
                 "logps/chosen": -3.0 + 0.1 * i, "logps/rejected": -3.0 - 0.2 * i} for i in range(4)]
        (run / "train" / a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ci(ref: str, arm: str) -> dict:
    return paired_delta([i in RIGHT[ref] for i in range(20)], [i in RIGHT[arm] for i in range(20)])


def test_report_opens_with_three_sentences_and_keeps_the_comparisons(tmp_path):
    path = _run(tmp_path)
    cfg, _ = load_run_config(path)
    out = write_report(cfg, path)
    s = json.loads((out / "summary.json").read_text())
    h = s["headline"]
    assert h["treatment"] == "tree-rpo"
    assert {k: (v["reference"], round(v["delta_pp"], 6)) for k, v in h["comparisons"].items()} == {
        "vs base": ("base", 40.0), "vs baseline": ("final-answer-rpo", 20.0), "vs control": ("nll-control", 0.0)}
    base, naive, ctl = _ci("base", "tree-rpo"), _ci("final-answer-rpo", "tree-rpo"), _ci("nll-control", "tree-rpo")
    assert base["ci_low_pp"] > 0 and naive["ci_low_pp"] > 0 and ctl["ci_low_pp"] < 0 < ctl["ci_high_pp"]
    assert h["comparisons"]["vs control"]["ci_low_pp"] == ctl["ci_low_pp"]

    def f(x):
        return f"{x:+.1f}".replace("-", "\u2212")
    assert h["sentences"] == [
        f"The treatment `tree-rpo` answered 90.0 % of 20 eval problems against 50.0 % for the base model: +40.0 "
        f"points (95 % CI {f(base['ci_low_pp'])} to {f(base['ci_high_pp'])}), a clear gain.",
        f"Against the baseline `final-answer-rpo` (70.0 %, the same 4 steps) it is +20.0 points (95 % CI "
        f"{f(naive['ci_low_pp'])} to {f(naive['ci_high_pp'])}), a clear gain.",
        f"Against the control `nll-control` (90.0 %, the same 4 steps) it is +0.0 points (95 % CI "
        f"{f(ctl['ci_low_pp'])} to {f(ctl['ci_high_pp'])}), no clear difference (the interval includes zero).",
    ]
    md = (out / "report.md").read_text().splitlines()
    assert md[4:7] == ["## What the run found", "", " ".join(h["sentences"])]
    assert sorted(p.name for p in out.glob("*.png")) == ["accuracy.png", "training.png"]  # no stage ran


def test_headline_says_what_is_missing(tmp_path):
    path = _run(tmp_path, arms=("tree-rpo",))
    cfg, _ = load_run_config(path)
    h = json.loads((write_report(cfg, path) / "summary.json").read_text())["headline"]
    assert list(h["comparisons"]) == ["vs base"]
    assert h["sentences"][1:] == ["This run has no evaluated baseline arm to compare `tree-rpo` with.",
                                  "This run has no evaluated control arm to compare `tree-rpo` with."]
    (tmp_path / "run" / "eval" / "tree-rpo.json").unlink()
    h = json.loads((write_report(cfg, path) / "summary.json").read_text())["headline"]
    assert h["comparisons"] == {} and h["sentences"][0].startswith("No treatment arm and base model")


def test_plot_inputs(tmp_path):
    cfg, _ = load_run_config(_run(tmp_path))
    assert _nll_coefs(cfg) == {"tree-rpo": 1.0, "final-answer-rpo": 1.0}  # the NLL control has no preference term
    rows = [{"loss": 0.75, "nll": 0.05}, {"loss": 0.5, "nll": 0.25}]
    assert preference_loss(rows, 1.0) == pytest.approx([0.7, 0.25])
    assert smooth([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert varying_margins({"tree": {"margins": [1.0, 1.0, 1.0]}, "fa": {"margins": [0.5, 1.0]}, "x": {}}) == \
        {"fa": [0.5, 1.0]}


def test_tree_statistics():
    def node(depth, terminal=False, correct=None):
        return {"depth": depth, "is_terminal": terminal, "correct": correct}
    trees = pa.table({"nodes": [[node(0), node(1), node(2, True, True), node(2, True, False)],
                                [node(0), node(1, True, False)]]})
    a = _tree_arrays(trees)
    assert a == {"nodes": [4, 2], "depths": [2, 1], "terminal_correct": 1, "terminal_wrong": 2}
    assert _tree_stats(a) == {"trees": 2, "nodes_mean": 3.0, "nodes_max": 4, "depth_max": 2, "terminal_nodes": 3,
                              "terminal_correct_share": pytest.approx(1 / 3)}
