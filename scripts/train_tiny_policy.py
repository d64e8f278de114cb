"""Train the tiny policy for the bundled task and write it as a model folder (default: data/tiny-policy).

    .venv/bin/python scripts/train_tiny_policy.py --config data/tiny-policy/train_config.yaml --out data/tiny-policy

A thin caller of the Trainer's `mode: sft` (pipeline/train/trainer.py; options in docs/trainer.md): it draws the
bundled task's training problems, writes them as a prompts table (prompt -> `gold` solution), builds or loads the
model, and runs the Trainer with the config's `train` section, which holds the recipe (cosine schedule with a
floor, length bucketing, AdamW settings). Its own part is the bundled-task evals: every `eval_every` steps (and at
the last) the Trainer's `on_step` hook measures greedy accuracy on `eval_n` eval problems of the training
distribution and saves a checkpoint into OUT/checkpoint, so a run cut short still leaves its latest model.

The folder gets model.safetensors, config.json, tokenizer files, history.json (losses and evals) and
TRAINING.md (command, wall time, final greedy accuracy on the eval split with a 95 % interval).
A bad config exits 2 with one `error:` line naming the file and the key, before any problem is drawn.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from pipeline.config_io import read_config, validate  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table  # noqa: E402
from pipeline.tasks.verify import verify_answer  # noqa: E402
from pipeline.tiny_model import TinyModelConfig, build_model, build_tokenizer, save_tokenizer  # noqa: E402
from pipeline.train.config import TrainConfig, parse_config  # noqa: E402
from pipeline.train.sft import greedy_accuracy  # noqa: E402
from pipeline.train.trainer import Trainer  # noqa: E402

# What the script itself decides for the Trainer: the data is the table it writes, the model the one it builds,
# the loss the gold solutions' NLL; files go to a scratch folder (the model folder gets only the final model).
FIXED = {"mode": "sft", "sft_column": "gold", "device": "cpu", "dtype": "fp32", "save_final": False,
         "drift_probe": 0, "progress": False}


class TrainTinyConfig(BaseModel):
    """Everything that made the committed tiny policy."""
    model_config = ConfigDict(extra="forbid")

    task: dict = Field(default_factory=dict, description="overrides of TaskConfig.tiny() for the TRAINING problems "
                       "(the reported accuracy is always on TaskConfig.tiny()'s eval split)")
    n_train: int = Field(40_000, ge=1, description="distinct training problems")
    final_eval_n: int = Field(1000, ge=1, description="eval problems for the reported accuracy")
    threads: int = Field(1, ge=1, description="torch threads")
    init_from: str | None = Field(None, description="start from the weights in this model folder (a checkpoint of "
                                  "an earlier phase) instead of a fresh init (seeded by train.seed)")
    model: TinyModelConfig = Field(default_factory=TinyModelConfig)
    eval_every: int = Field(250, ge=0, description="greedy eval every this many steps and at the last (0 = never)")
    eval_n: int = Field(200, ge=1, description="eval problems (of the training distribution) used during training")
    log_every: int = Field(50, ge=1, description="print the mean train loss every this many steps")
    train: dict = Field(default_factory=dict, description="TrainConfig fields (docs/trainer.md) except "
                        f"model, data, output_dir, threads and {', '.join(FIXED)}, which the script sets; "
                        "max_steps is required")


def load_config(path: Path, sets: list[str]) -> tuple[TrainTinyConfig, TrainConfig]:
    """The script's settings and the Trainer's config; a bad key is an InputError naming the file and the key."""
    raw = read_config(path, "tiny-policy config") or {}
    for item in sets:
        key, sep, val = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r}: expected SECTION.KEY=YAML")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(val)
    cfg = validate(TrainTinyConfig, raw, file=str(path), what="tiny-policy config")
    for key in ("model", "data", "output_dir", "threads", *FIXED):
        if key in cfg.train:
            raise InputError("set by the script, not by the config", file=str(path), column=f"train.{key}")
    if "max_steps" not in cfg.train:
        raise InputError("required: the schedule and the evals count steps", file=str(path),
                         column="train.max_steps")
    train = parse_config({**cfg.train, **FIXED, "model": cfg.init_from or "fresh init", "data": "-",
                          "output_dir": "-", "threads": cfg.threads}, file=str(path), prefix=("train",))
    return cfg, train


def by_steps(results: list[bool], problems) -> dict[int, float]:
    out: dict[int, list[bool]] = {}
    for ok, p in zip(results, problems):
        out.setdefault(p.n_steps, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def train(cfg: TrainTinyConfig, tcfg: TrainConfig, train_task: TaskConfig, out: Path, log=print):
    """Train (or continue) the tiny policy with the Trainer; returns (model, tokenizer, history)."""
    problems = make_split(train_task, "train", cfg.n_train)
    train_eval = make_split(train_task, "eval", cfg.eval_n) if cfg.eval_every else []
    tok = build_tokenizer()
    if cfg.init_from:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from)
    else:
        model = build_model(cfg.model, tok, seed=tcfg.seed)
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; {len(problems)} train problems; "
        f"train task {train_task.model_dump_json()}")
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    losses: list[float] = []
    t0 = time.time()

    def on_step(step: int, m: dict) -> None:
        losses.append(m["loss"])
        last = step == tcfg.max_steps
        if step % cfg.log_every == 0 or last:
            rec = {"step": step, "loss": sum(losses) / len(losses), "lr": m["learning_rate"],
                   "elapsed_s": round(time.time() - t0, 1)}
            history.append(rec)
            log(f"step {step} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['elapsed_s']}s")
            losses.clear()
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            ev = greedy_accuracy(model, tok, train_eval)
            history.append({"step": step, "eval_accuracy": ev["accuracy"], "eval_steps_all_right":
                            ev["steps_all_right"], "elapsed_s": round(time.time() - t0, 1)})
            log(f"step {step} eval acc {ev['accuracy']:.3f} steps-right {ev['steps_all_right']:.3f} "
                f"e.g. {ev['texts'][0]!r}")
            model.save_pretrained(out / "checkpoint")  # a run cut short still leaves its latest model
            save_tokenizer(tok, out / "checkpoint")

    with tempfile.TemporaryDirectory(prefix="train-tiny-policy-") as scratch:
        data = Path(scratch) / "train.parquet"
        pq.write_table(problems_to_table(problems), data)
        run_cfg = tcfg.model_copy(update={"data": str(data), "output_dir": str(Path(scratch) / "run")})
        Trainer(run_cfg, model=model, tokenizer=tok).train(on_step=on_step)
    return model, tok, history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("data/tiny-policy/train_config.yaml"))
    ap.add_argument("--out", type=Path, default=Path("data/tiny-policy"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override one setting, e.g. --set train.max_steps=500 (for pilot runs)")
    ap.add_argument("--eval-only", action="store_true",
                    help="skip training: evaluate the model already in --out and rewrite TRAINING.md")
    args = ap.parse_args()
    try:
        cfg, tcfg = load_config(args.config, args.set)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
        model, tok, history = train(cfg, tcfg, train_task, args.out, log=lambda s: print(s, flush=True))
        command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/train_tiny_policy.py"] + sys.argv[1:])
        record = {"command": command, "init_from": cfg.init_from, "train_wall_s": time.time() - t0, "history": history,
                  "train_task": train_task.model_dump()}
        model.save_pretrained(args.out)
        save_tokenizer(tok, args.out)
        shutil.rmtree(args.out / "checkpoint", ignore_errors=True)

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
the Trainer's `mode: sft` (`scripts/train_tiny_policy.py`) on gold solutions (fp32, CPU,
{cfg.threads} thread(s)).

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

Greedy accuracy during training (first {cfg.eval_n} eval problems of the training distribution):

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
