"""Train the tiny policy for the bundled task and write it as a model folder (default: data/tiny-policy).

    .venv/bin/python scripts/train_tiny_policy.py --config data/tiny-policy/train_config.yaml --out data/tiny-policy

The folder gets model.safetensors, config.json, tokenizer files, history.json (losses and evals) and
TRAINING.md (command, wall time, final greedy accuracy on the eval split with a 95 % interval).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from pipeline.tasks.arith import TaskConfig, make_split  # noqa: E402
from pipeline.tasks.verify import verify_answer  # noqa: E402
from pipeline.tiny_model import TinyModelConfig, build_model, build_tokenizer, save_tokenizer  # noqa: E402
from pipeline.train.sft import SFTConfig, greedy_accuracy, train_sft  # noqa: E402


class TrainTinyConfig(BaseModel):
    """Everything that made the committed tiny policy."""

    task: dict = Field(default_factory=dict, description="overrides of TaskConfig.tiny() for the TRAINING problems "
                       "(the reported accuracy is always on TaskConfig.tiny()'s eval split)")
    n_train: int = Field(40_000, description="distinct training problems")
    final_eval_n: int = Field(1000, description="eval problems for the reported accuracy")
    threads: int = Field(1, description="torch threads")
    init_from: str | None = Field(None, description="start from the weights in this model folder (a checkpoint of "
                                  "an earlier phase) instead of a fresh init")
    model: TinyModelConfig = Field(default_factory=TinyModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)


def load_config(path: Path, sets: list[str]) -> TrainTinyConfig:
    raw = yaml.safe_load(path.read_text()) or {}
    for item in sets:
        key, val = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(val)
    return TrainTinyConfig(**raw)


def by_steps(results: list[bool], problems) -> dict[int, float]:
    out: dict[int, list[bool]] = {}
    for ok, p in zip(results, problems):
        out.setdefault(p.n_steps, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("data/tiny-policy/train_config.yaml"))
    ap.add_argument("--out", type=Path, default=Path("data/tiny-policy"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override one setting, e.g. --set sft.steps=500 (for pilot runs)")
    ap.add_argument("--eval-only", action="store_true",
                    help="skip training: evaluate the model already in --out and rewrite TRAINING.md")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    torch.set_num_threads(cfg.threads)
    train_task, task = TaskConfig.tiny(**cfg.task), TaskConfig.tiny()
    eval_problems = make_split(task, "eval", cfg.final_eval_n)
    history_file = args.out / "history.json"

    if args.eval_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok, model = AutoTokenizer.from_pretrained(args.out), AutoModelForCausalLM.from_pretrained(args.out)
        record = json.loads(history_file.read_text())
    else:
        t0 = time.time()
        train = make_split(train_task, "train", cfg.n_train)
        train_eval = make_split(train_task, "eval", cfg.sft.eval_n)
        tok = build_tokenizer()
        if cfg.init_from:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(cfg.init_from)
        else:
            model = build_model(cfg.model, tok, seed=cfg.sft.seed)
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; {len(train)} train problems; "
              f"train task {train_task.model_dump_json()}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        ckpt = args.out / "checkpoint"

        def save_checkpoint(step: int) -> None:  # so a run cut short still leaves its latest model
            model.save_pretrained(ckpt)
            save_tokenizer(tok, ckpt)

        history = train_sft(model, tok, train, train_eval, cfg.sft, log=lambda s: print(s, flush=True),
                            on_eval=save_checkpoint)
        command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/train_tiny_policy.py"] + sys.argv[1:])
        record = {"command": command, "init_from": cfg.init_from, "train_wall_s": time.time() - t0, "history": history,
                  "train_task": train_task.model_dump()}
        model.save_pretrained(args.out)
        save_tokenizer(tok, args.out)
        shutil.rmtree(ckpt, ignore_errors=True)

    final = greedy_accuracy(model, tok, eval_problems)
    texts = final.pop("texts")
    oks = [verify_answer(t, p) for t, p in zip(texts, eval_problems)]
    final["by_steps"] = by_steps(oks, eval_problems)
    first = oks[:200]
    record["final"] = final
    record["final_first_200"] = {"n": len(first), "accuracy": sum(first) / max(1, len(first))}
    record["task"] = task.model_dump()
    record["n_params"] = sum(p.numel() for p in model.parameters())
    print(f"final greedy accuracy {final['accuracy']:.3f} {final['ci95']} on {final['n']}; by steps "
          f"{final['by_steps']}; first 200: {record['final_first_200']['accuracy']:.3f}", flush=True)
    history_file.write_text(json.dumps(record, indent=1))
    write_training_md(args.out, cfg, record)


NOTES_MARK = "<!-- notes below this line are kept when the script rewrites this file -->"


def write_training_md(out: Path, cfg: TrainTinyConfig, record: dict) -> None:
    task, train_task, final = TaskConfig(**record["task"]), TaskConfig(**record["train_task"]), record["final"]
    evals = [h for h in record["history"] if "eval_accuracy" in h]
    curve = "\n".join(f"| {h['step']} | {h['elapsed_s']:.0f} | {h['eval_accuracy']:.3f} | "
                      f"{h['eval_steps_all_right']:.3f} |" for h in evals)
    steps = ", ".join(f"{k} steps: {v:.3f}" for k, v in final["by_steps"].items())
    lo, hi = final["ci95"]
    m = cfg.model
    origin = f"from the weights in `{record['init_from']}`" if record.get("init_from") else "from scratch"
    text = f"""# Tiny policy for the bundled arithmetic task

A {record['n_params'] / 1e6:.2f}M-parameter char-level Llama ({m.num_hidden_layers} layers, width {m.hidden_size},
MLP {m.intermediate_size}, {m.num_attention_heads} heads, tied embeddings), trained {origin} by
`pipeline/train/sft.py` on gold solutions (fp32, CPU, {cfg.threads} thread(s)).

Command (run from the repository root):

    {record['command']}

Training wall time (data + training + evals during training): {record['train_wall_s'] / 60:.1f} min.

**Greedy accuracy on the first {final['n']} eval problems of `TaskConfig.tiny()`: {final['accuracy']:.3f}
(95 % Wilson interval [{lo:.3f}, {hi:.3f}]).** By number of steps: {steps}.
All steps right (step verifier): {final['steps_all_right']:.3f}.
The first 200 of those problems (what tests/test_tiny_policy.py checks): {record['final_first_200']['accuracy']:.3f}.

`TaskConfig.tiny()`: {task.min_steps}-{task.max_steps} steps, ops {task.ops}, start {task.start_min}-{task.start_max},
+/- operands {task.operand_min}-{task.operand_max}, * operands {task.mul_min}-{task.mul_max}, values <= {task.max_value},
templates {task.templates}.
Training problems: the same except {train_task.min_steps}-{train_task.max_steps} steps.

Greedy accuracy during training (first {cfg.sft.eval_n} eval problems of the training distribution):

| step | elapsed s | accuracy | all steps right |
|---|---|---|---|
{curve}

Settings: `train_config.yaml` next to this file; losses and evals: `history.json`.

{NOTES_MARK}
"""
    md = out / "TRAINING.md"
    old = md.read_text() if md.exists() else ""
    notes = old.split(NOTES_MARK, 1)[1].lstrip("\n") if NOTES_MARK in old else ""
    md.write_text(text + notes)  # hand-written notes below the marker survive a rerun


if __name__ == "__main__":
    main()
