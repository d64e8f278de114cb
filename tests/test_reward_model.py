"""Reward models (docs/reward-model.md): `prefpipe train --mode reward` makes a sequence-classification folder that
the scorer (pipeline/judges/reward_model.py) and plain `transformers` load and score as in training; tree search
values nodes with it in one scoring call per round and no rollouts."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.backends.fixtures import build_tiny_llama
from pipeline.errors import InputError
from pipeline.judges.reward_model import RewardModelScorer, encode, pad_batch
from pipeline.train.config import TrainConfig
from pipeline.train.launch import make_trainer
from pipeline.train.reward import pair_metrics, split_prompts, step_prefixes

# The preference the fixture teaches: one answer (A) over the other (B), after a step that varies with the prompt.
PROBLEMS = [(a, b) for a in range(1, 9) for b in range(1, 5)]


def _pairs(problems) -> list[dict]:
    return [{"prompt_id": f"p{a}-{b}", "prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}\nAnswer: A",
             "rejected": f"{a} + {b} = {a + b}\nAnswer: B", "pair_type": "terminal"} for a, b in problems]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama classifier trained for 40 steps on 32 pairs (8 held out), saved as a folder."""
    root = tmp_path_factory.mktemp("rm")
    base = build_tiny_llama(root / "base", hidden=64, layers=2, heads=1)
    pq.write_table(pa.Table.from_pylist(_pairs(PROBLEMS)), root / "pairs.parquet")
    cfg = TrainConfig(model=str(base), data=str(root / "pairs.parquet"), mode="reward", output_dir=str(root / "out"),
                      lr=3e-3, lr_schedule="constant", max_steps=40, micro_batch=8, progress=False, threads=1,
                      reward={"eval_fraction": 0.25, "eval_every": 20})
    trainer = make_trainer(cfg)
    trainer.train()
    return trainer, root / "out"


def test_trained_folder_prefers_what_it_was_trained_on(trained):
    trainer, out = trained
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"], summary["steps"]) == (24, 8, 40)
    assert [e["step"] for e in summary["evals"]] == [20, 40]
    scorer = RewardModelScorer(out / "final", device="cpu")
    rows = _pairs(PROBLEMS)
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) == len(rows)  # held-out prompts too
    # the summary's held-out metrics are these scores' accuracy and margin
    held = {r["prompt_id"] for r in trainer.eval_table.to_pylist()}
    idx = [i for i, r in enumerate(rows) if r["prompt_id"] in held]
    assert summary["final_eval"]["accuracy"] == 1.0
    assert summary["final_eval"]["margin"] == pytest.approx(np.mean([chosen[i] - rejected[i] for i in idx]),
                                                            abs=1e-5)


def test_batched_equals_unbatched(trained):
    _, out = trained
    prompts = [f"What is {a} + {b}?" for a, b in PROBLEMS[:12]]
    responses = [f"{a} + {b} = {a + b}" + "\nStep 2: ok" * (i % 3) for i, (a, b) in enumerate(PROBLEMS[:12])]
    one = RewardModelScorer(out / "final", device="cpu", batch_size=1).score(prompts, responses)
    many = RewardModelScorer(out / "final", device="cpu", batch_size=8).score(prompts, responses)
    assert len({len(r) for r in responses}) > 1  # rows of different lengths share a padded batch
    assert np.max(np.abs(np.array(one) - np.array(many))) < 1e-5


def test_reloaded_folder_scores_as_in_training(trained):
    """transformers' own loader and pooling on the saved folder = the in-memory model of the training run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    trainer, out = trained
    rows = _pairs(PROBLEMS[:10])
    prompts, responses = [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    in_training = trainer.score(prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    ids, mask = pad_batch([encode(tok, p, r) for p, r in zip(prompts, responses)], model.config.pad_token_id, "cpu")
    with torch.no_grad():
        reloaded = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    assert np.max(np.abs(np.array(in_training) - np.array(reloaded))) < 1e-5


def test_step_ranking_comparisons_and_loss(trained):
    """Tree-PLV's form compares the sides' prefixes from the first differing step to the end; its loss is the sum
    of -log sigmoid over those comparisons, averaged over pairs."""
    assert step_prefixes("a\nb\nc", "a\nx\ny\nz", "\n") == [("a\nb", "a\nx"), ("a\nb\nc", "a\nx\ny"),
                                                              ("a\nb\nc", "a\nx\ny\nz")]
    assert step_prefixes("a\nb", "a\nc", "\n") == [("a\nb", "a\nc")]  # one step: the pairwise comparison
    trainer, _ = trained
    from pipeline.train.reward import encode_reward_pairs
    rcfg = trainer.rcfg.model_copy(update={"objective": "step_ranking"})
    table = pa.Table.from_pylist([{"prompt": "What is 1 + 2?", "chosen": "Step 1: 1 + 2 = 3\nAnswer: 3",
                                   "rejected": "Step 1: 1 + 2 = 4\nAnswer: 4"}])
    trainer.data = encode_reward_pairs(table, trainer.tokenizer, rcfg, 1024)
    assert len(trainer.data.comparisons[0]) == 2
    s = trainer.score(["What is 1 + 2?"] * 4, ["Step 1: 1 + 2 = 3", "Step 1: 1 + 2 = 4",
                                               "Step 1: 1 + 2 = 3\nAnswer: 3", "Step 1: 1 + 2 = 4\nAnswer: 4"])
    want = -(math.log(1 / (1 + math.exp(-(s[0] - s[1])))) + math.log(1 / (1 + math.exp(-(s[2] - s[3])))))
    trainer.model.eval()
    with torch.no_grad():
        loss, _ = trainer.micro_loss([0], 1)
    assert float(loss) == pytest.approx(want, abs=1e-5)


def test_pair_metrics_and_prompt_split():
    m = pair_metrics(np.array([1.0, 2.0, 0.0, 3.0]), np.array([0.0, 3.0, 0.0, 1.0]), ["a", "a", "b", "b"])
    assert (m["pairs"], m["accuracy"], m["margin"]) == (4, 0.5, 0.5)  # the tie counts wrong
    assert m["by_pair_type"] == {"a": {"pairs": 2, "accuracy": 0.5}, "b": {"pairs": 2, "accuracy": 0.5}}
    rows = _pairs(PROBLEMS) + _pairs(PROBLEMS[:4])  # 4 prompts with two pairs each
    train, held = split_prompts(pa.Table.from_pylist(rows), 0.25, seed=1)
    held_ids = set(held["prompt_id"].to_pylist())
    assert len(held_ids) == 8 and not held_ids & set(train["prompt_id"].to_pylist())
    assert train.num_rows + held.num_rows == len(rows)


def test_bad_pairs_fail_before_any_model_loads(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a"}]), tmp_path / "bad.parquet")
    cfg = TrainConfig(model=str(tmp_path / "no-such-model"), data=str(tmp_path / "bad.parquet"), mode="reward",
                      output_dir=str(tmp_path / "out"))
    with pytest.raises(InputError) as e:
        make_trainer(cfg)
    assert e.value.column == "rejected" and "bad.parquet" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_value_model_goes_with_value_fn_reward_model():
    from stages.tree.config import SearchConfig
    with pytest.raises(ValueError, match="value_model"):
        SearchConfig(value_fn="reward_model")
    with pytest.raises(ValueError, match="value_model"):
        SearchConfig(value_fn="rollout", value_model="some/folder")


def test_tree_search_with_learned_values_makes_no_rollouts(trained):
    """Best-first search on the tiny policy valued by the reward model: every backend call is a step expansion
    (step stop strings, step token budget), one per round; every non-terminal node's value is the sigmoid of the
    scorer's score of prompt + prefix + step."""
    from pipeline.backends import make_backend
    from pipeline.judges.reward_model import load_scorer
    from pipeline.stage import StageContext
    from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table
    from stages.tree_search import TreeSearchConfig, run
    _, out = trained
    problems = make_split(TaskConfig.tiny(), "eval", 4)
    table = problems_to_table(problems)
    backend = make_backend("transformers", "tiny-policy", device="cpu")
    calls = []
    real_continue, real_logprobs = backend.continue_, backend.logprobs
    backend.continue_ = lambda p, pre, s, n=1: calls.append((s.max_tokens, tuple(s.stop), n)) or \
        real_continue(p, pre, s, n=n)
    backend.logprobs = lambda *a, **k: calls.append("logprobs") or real_logprobs(*a, **k)
    cfg = TreeSearchConfig(variant="best_first", value_fn="reward_model", value_model=str(out / "final"),
                           best_first_k=3, expansion_budget=3, validity_rollouts=0)
    res = run(table, cfg, backend, StageContext("fp", 0, 5))
    assert calls == [(cfg.step_max_tokens, ("\n",), 3)] * 3
    scorer = load_scorer(str(out / "final"))
    checked = 0
    for row in res["trees"].to_pylist():
        nodes = {n["node_id"]: n for n in row["nodes"]}
        for n in nodes.values():
            if n["parent_id"] is None or n["is_terminal"]:
                continue
            path, cur = [], n
            while cur["parent_id"] is not None:
                path.append(cur["step_text"])
                cur = nodes[cur["parent_id"]]
            s = scorer.score([row["prompt"]], ["\n".join(reversed(path))])[0]
            assert n["reward"] == pytest.approx(1 / (1 + math.exp(-s)), abs=1e-6) and n["rollout_success"] is None
            checked += 1
    assert checked >= 9  # 3 rounds of 3 candidates per tree, duplicates and terminals aside


def test_reward_options_from_the_command_line():
    """`prefpipe train` options reach the reward section; one pair type is a list of one (the option parser makes
    a list only from a comma list)."""
    from pipeline.train.cli import overrides
    from pipeline.train.config import load_config
    cfg = load_config(None, {"model": "m", "data": "d", **overrides(
        {"mode": "reward", "reward__pair_types": "first_wrong_step", "reward__objective": "step_ranking"})})
    assert (cfg.mode, cfg.reward.pair_types, cfg.reward.objective) == ("reward", ["first_wrong_step"], "step_ranking")
    assert load_config(None, {"model": "m", "data": "d", **overrides({"reward__pair_types": "a,b"})}
                       ).reward.pair_types == ["a", "b"]
