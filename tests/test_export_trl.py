"""The export trains in TRL as in prefpipe: same rows, same token ids, same step-1 loss and log-probs.

One run of the bundled task's problems, labelled by a model-free stage whose generator is the bundled tiny
policy (it has a chat template, so the export is conversational): terminal pairs (gold solution vs a wrong
answer, a system prompt on some rows), step pairs (a verified first line, then a right or wrong second line),
chain-of-thought SFT rows, and the inputs' gold solutions. The reference model is the tiny policy with seeded
noise added, so the DPO loss is not log 2 and the policy/reference terms both count.

Tolerances: both trainers run the same fp32 model on the same token ids; only the order of float32 sums differs
(TRL pads a batch differently and reduces over the batch in its own order). Summed log-probs of ~40 tokens of
magnitude ~2 carry ~40 x 2 x 6e-8 ~ 5e-6 of rounding each, well inside 1e-4; the loss is a mean of
log-sigmoid(beta x (difference of those sums)) with beta 0.1, so its error is ~0.1 x 1e-5, inside 1e-5.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine import run_stage
from pipeline.hub import ExportConfig, export_run
from pipeline.hub_card import STEP_EOS_FIX
from pipeline.hub_rows import PAIR_PROVENANCE
from pipeline.stage import StageConfig, StageSpec
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "data" / "tiny-policy")
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
N = 8
SYSTEM = "Answer step by step."


class PairsConfig(StageConfig):
    version: ClassVar[str] = "1"


def _wrong(line: str) -> str:
    """The same step line with its result off by one ("... = 23" -> "... = 24")."""
    head, value = line.rsplit("= ", 1)
    return f"{head}= {int(value) + 1}"


def _labelled(rows: pa.Table, cfg, backend, ctx) -> dict[str, pa.Table]:
    problems = {p.id: p for p in make_split(TaskConfig.tiny(), "train", n=N)}
    pairs, sft = [], []
    for pid in rows.column("prompt_id").to_pylist():
        p = problems[pid]
        common = {"prompt_id": pid, "prompt": p.question, "stage": "synthetic", "method": "gold-vs-wrong",
                  "generator_model": "tiny-policy", "created_at": EPOCH, "status": "ok", "error": None,
                  "extra": json.dumps({"task": "arith"})}
        wrong_answer = p.gold_solution.rsplit("Answer: ", 1)[0] + f"Answer: {p.answer + 1}"
        k = list(problems).index(pid)  # the problem's place in the run (a stage call sees one shard)
        pairs.append({**common, "pair_id": f"t-{pid}", "row_key": ctx.row_key(pid, 0), "pair_type": "terminal",
                      "system": SYSTEM if k % 2 == 0 else None, "shared_prefix": None, "chosen": p.gold_solution,
                      "rejected": wrong_answer, "chosen_score": 1.0, "rejected_score": 0.0, "score_margin": 1.0,
                      "chosen_is_terminal": True, "rejected_is_terminal": True,
                      "chosen_correct": True, "rejected_correct": k % 3 == 0})
        prefix = p.gold_steps[0] + "\n"
        pairs.append({**common, "pair_id": f"s-{pid}", "row_key": ctx.row_key(pid, 1), "pair_type": "first_wrong_step",
                      "system": None, "shared_prefix": prefix, "chosen": prefix + p.gold_steps[1],
                      "rejected": prefix + _wrong(p.gold_steps[1]), "chosen_score": 1.0, "rejected_score": 0.0,
                      "score_margin": 1.0, "chosen_is_terminal": False, "rejected_is_terminal": False,
                      "chosen_correct": None, "rejected_correct": None})
        sft.append({"prompt_id": pid, "prompt": p.question, "sample_index": 0, "text": p.gold_solution,
                    "model": "tiny-policy", "sampling": "{}", "row_key": ctx.row_key(pid, 2), "status": "ok",
                    "error": None})
    return {"main": pa.Table.from_pylist(pairs), "cot": pa.Table.from_pylist(sft)}


SPEC = StageSpec("labelled", PairsConfig, _labelled, "prompts", {"main": "pairs", "cot": "generations"},
                 needs_backend=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The run, its export and a reference model that differs from the policy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path_factory.mktemp("trl")
    run_dir = base / "run"
    inputs = problems_to_table(make_split(TaskConfig.tiny(), "train", n=N))
    (run_dir / "inputs").mkdir(parents=True)
    pq.write_table(inputs, run_dir / "inputs" / "prompts.parquet")
    run_stage(SPEC, inputs.select(["prompt_id", "prompt"]), PairsConfig(), None, RunStore(run_dir), shard_size=3,
              fail_threshold=1.0, progress=False)
    export = export_run(run_dir, base / "export")
    ref = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    ref.save_pretrained(base / "ref")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(base / "ref")
    return {"run_dir": run_dir, "export": export, "ref": str(base / "ref"), "base": base}


def _prefpipe(data: str, ref: str, out: Path, **tokenize):
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import Trainer

    cfg = TrainConfig(model=TINY, ref_model=ref, data=data, output_dir=str(out), device="cpu", max_steps=1,
                      micro_batch=N, lr=1e-6, save_final=False, progress=False, drift_probe=0,
                      ref_cache_dir=str(out / "refcache"), tokenize=tokenize)
    trainer = Trainer(cfg)
    return trainer, trainer.train().history[0]


def _trl(dataset, ref: str, out: Path, trainer_cls=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=N, max_steps=1, learning_rate=1e-6,
                     beta=0.1, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to=[],
                     disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0, seed=0)
    trainer = (trainer_cls or DPOTrainer)(
        model=AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32), args=args,
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(TINY))
    trainer.train()
    return trainer, trainer.state.log_history[0]


def _load(export, name: str | None = None):
    """A config's train split, through a cache of its own (`datasets` keys its shared cache by file metadata,
    which two exports written in the same second can share)."""
    import datasets

    cache = export.folder.parent / f".ds-cache-{export.folder.name}"
    return datasets.load_dataset(str(export.folder), name=name, cache_dir=str(cache))["train"]


def _by_id(trainer, table: pa.Table) -> dict:
    """pair_id -> (prompt ids, chosen ids, rejected ids) of a prefpipe trainer's encoded rows."""
    ids = table.column("pair_id").to_pylist()
    d = trainer.data
    return {ids[r]: (d.prompts[i], d.completions[i][0], d.completions[i][1]) for i, r in enumerate(d.rows)}


def test_export_formats(run):
    export = run["export"]
    assert {c.name: (c.format, c.splits["train"]) for c in export.configs} == {
        "labelled": ("conversational", N), "labelled-steps": ("step", N), "labelled-cot": ("messages", N),
        "gold-sft": ("messages", N)}
    assert export.configs[0].name == "labelled"  # the terminal pairs are the default (the biggest pairs config)
    problems = {p.id: p for p in make_split(TaskConfig.tiny(), "train", n=N)}
    rows = _load(export, "labelled").with_format("arrow")[:].to_pylist()
    first = rows[0]  # problems 0, 2, 4, ... have a system prompt
    p = problems[first["prompt_id"]]
    assert first["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p.question}]
    assert first["chosen"] == [{"role": "assistant", "content": p.gold_solution}]
    assert sum(len(r["prompt"]) == 2 for r in rows) == N // 2
    # Only what a trainer reads and provenance: no row_key, status, error, extra, created_at.
    assert {"pair_id", "prompt_id", "stage", "method", "pair_type", "generator_model", "chosen_score",
            "rejected_score", "score_margin", "chosen_correct", "rejected_correct"} <= set(first)
    assert set(first) - {"prompt", "chosen", "rejected"} <= set(PAIR_PROVENANCE)
    step = _load(export, "labelled-steps")[0]
    p = problems[step["prompt_id"]]
    assert step["prompt"] == f"<|bos|><|user|>\n{p.question}\n<|assistant|>\n{p.gold_steps[0]}\n"
    assert (step["chosen"], step["rejected"]) == (p.gold_steps[1], _wrong(p.gold_steps[1]))
    assert json.loads(step["prompt_messages"]) == [{"role": "user", "content": p.question}]
    assert step["chosen_is_terminal"] is False and step["rejected_is_terminal"] is False


def test_dpo_terminal_pairs_agree_with_trl(run, tmp_path):
    export, ref = run["export"], run["ref"]
    ours, ours_log = _prefpipe(f"{export.folder}@labelled", ref, tmp_path / "ours")
    store, _ = _prefpipe(str(run["run_dir"] / "labelled"), ref, tmp_path / "store")
    ds = _load(export, "labelled")
    trl, trl_log = _trl(ds, ref, tmp_path / "trl")
    # Same token ids: from the export and from the store table (its terminal rows), and in TRL.
    table = ours.table
    ours_ids = _by_id(ours, table)
    store_ids = _by_id(store, store.table)
    assert ours_ids == {k: v for k, v in store_ids.items() if k.startswith("t-")}
    prepared = trl.train_dataset
    for pid, p, c, r in zip(ds["pair_id"], prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]):
        assert (p, c, r) == ours_ids[pid], pid
    assert trl_log["loss"] == pytest.approx(ours_log["loss"], abs=1e-5)
    assert trl_log["logps/chosen"] == pytest.approx(ours_log["logps/chosen"], abs=1e-4)
    assert trl_log["logps/rejected"] == pytest.approx(ours_log["logps/rejected"], abs=1e-4)
    assert abs(ours_log["loss"] - math.log(2)) > 1e-3  # the reference differs from the policy


def test_dpo_step_pairs_differ_only_by_trl_eos(run, tmp_path):
    export, ref = run["export"], run["ref"]
    ours, ours_log = _prefpipe(f"{export.folder}@labelled-steps", ref, tmp_path / "ours", prefix_as_prompt=True)
    store, _ = _prefpipe(str(run["run_dir"] / "labelled"), ref, tmp_path / "store", prefix_as_prompt=True)
    ours_ids = _by_id(ours, ours.table)
    assert ours_ids == {k: v for k, v in _by_id(store, store.table).items() if k.startswith("s-")}
    ds = _load(export, "labelled-steps")
    trl, trl_log = _trl(ds, ref, tmp_path / "trl")
    eos = trl.processing_class.eos_token_id
    prepared = trl.train_dataset
    for pid, p, c, r in zip(ds["pair_id"], prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]):
        want_p, want_c, want_r = ours_ids[pid]
        assert p == want_p and p.count(trl.processing_class.bos_token_id) == 1  # one BOS, not two
        assert (c, r) == (want_c + [eos], want_r + [eos]), pid  # the documented difference: EOS after the step
    assert trl_log["logps/chosen"] < ours_log["logps/chosen"]  # the extra EOS token costs log-prob
    # The card's workaround removes it: then the two trainers agree.
    scope: dict = {}
    exec(STEP_EOS_FIX, scope)
    fixed, fixed_log = _trl(ds, ref, tmp_path / "fixed", scope["StepDPOTrainer"])
    assert [list(x) for x in fixed.train_dataset["chosen_ids"]] == [ours_ids[k][1] for k in ds["pair_id"]]
    assert fixed_log["loss"] == pytest.approx(ours_log["loss"], abs=1e-5)
    assert fixed_log["logps/chosen"] == pytest.approx(ours_log["logps/chosen"], abs=1e-4)
    assert fixed_log["logps/rejected"] == pytest.approx(ours_log["logps/rejected"], abs=1e-4)


def test_sft_trainer_on_gold_config(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = _load(run["export"], "gold-sft")
    assert ds[0]["messages"][-1]["content"].startswith("Step 1: ")
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=N, max_steps=2, learning_rate=3e-3,
                     use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                     dataloader_num_workers=0, seed=0, gradient_checkpointing=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32), args=args,
                         train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(TINY))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # One batch holds all N rows, so step 2 sees the rows step 1 just fitted: its loss must be lower.
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    # prefpipe's SFT mode reads the same config: the assistant turn is the completion, + EOS.
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import Trainer
    ours = Trainer(TrainConfig(model=TINY, data=f"{run['export'].folder}@gold-sft", mode="sft", device="cpu",
                               output_dir=str(tmp_path / "ours"), progress=False))
    gold = dict(zip(*pq.read_table(run["run_dir"] / "inputs" / "prompts.parquet",
                                   columns=["prompt_id", "gold"]).to_pydict().values()))
    tok = trainer.processing_class
    ids = ours.table["prompt_id"].to_pylist()
    assert {ids[r]: ours.data.completions[i][0] for i, r in enumerate(ours.data.rows)} == {
        pid: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for pid, text in gold.items()}


def test_load_dataset_every_config_round_trips(run):
    export = run["export"]
    default = _load(export)
    assert default.with_format("arrow")[:] == _load(export, "labelled").with_format("arrow")[:]
    for c in export.configs:
        loaded = _load(export, c.name).with_format("arrow")[:]
        files = pa.concat_tables([pq.read_table(export.folder / f) for f in c.files["train"]])
        assert loaded.to_pylist() == files.to_pylist(), c.name
    cot = {r["prompt_id"]: r["messages"] for r in _load(export, "labelled-cot")}
    store = RunStore(run["run_dir"]).stage("labelled").read("cot")
    assert cot == {pid: [{"role": "user", "content": q}, {"role": "assistant", "content": t}]
                   for pid, q, t in zip(store["prompt_id"].to_pylist(), store["prompt"].to_pylist(),
                                        store["text"].to_pylist())}


def test_standard_format_and_bos_adding_tokenizer(run, tmp_path):
    """--format standard: the templated prompt as text. With a tokenizer that adds its own BOS, the template's
    BOS is left out of the text, so TRL's tokenization has exactly one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    folder = tmp_path / "bos-model"
    tok.save_pretrained(folder)
    (folder / "config.json").write_text((Path(TINY) / "config.json").read_text())
    res = export_run(run["run_dir"], tmp_path / "std", ExportConfig(format="standard", tokenizer=str(folder)))
    assert {c.name: c.format for c in res.configs}["labelled"] == "standard"
    row = _load(res, "labelled")[0]
    assert row["prompt"] == f"<|system|>\n{SYSTEM}\n<|user|>\n{json.loads(row['prompt_messages'])[1]['content']}" \
                            "\n<|assistant|>\n"
    ids = AutoTokenizer.from_pretrained(folder)(row["prompt"])["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_card_says_formats_agreement_and_the_step_difference(run):
    card = run["export"].card_path.read_text()
    assert "| `labelled` | labelled | main | pairs | conversational | 8 | - |" in card
    assert "| `labelled-steps` | labelled | main | pairs | step | 8 | - |" in card
    assert "| `gold-sft` | inputs | gold | sft | messages | 8 | - |" in card
    # Terminal pairs: chosen always right, rejected right for problems 0, 3, 6 -> 5 agree, 3 both right.
    assert "| `labelled` | 8 | 5 (62.5 %) | 0 (0.0 %) | 3 (37.5 %) | 0 (0.0 %) |" in card
    assert ("`labelled`: the labels agree with the verifier on 62.5 % of the 8 verified pairs (chosen right, "
            "rejected wrong); 3 both right, 0 both wrong, 0 inverted.") in card.split("## Limitations")[1]
    assert "TRL appends EOS to every completion, also after a step that does not end the answer" in card
    assert STEP_EOS_FIX in card
