"""`prefpipe train [CONFIG.yaml] [options]`: train on a pair / ranked-list table and write the output folder.

The options are generated from `TrainConfig` (pipeline/config_options.py): `--lr`, `--max-steps`, and every nested
field as `--loss.beta`, `--list-loss.loss-type`, `--tokenize.max-length`. A few shortcuts keep their short names.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.config_options import collect, model_options, parse_value
from pipeline.train.config import TrainConfig, merge

# Short names for the most used nested fields: option -> (TrainConfig paths it sets, help).
SHORTCUTS: dict[str, tuple[tuple[str, ...], type, str]] = {
    "loss_type": (("loss.loss_type",), str, "= --loss.loss-type: pairwise loss, e.g. sigmoid, ipo, apo_zero; "
                                              "several as sigmoid,sft"),
    "beta": (("loss.beta", "list_loss.beta"), float, "β of the pairwise and of the list loss (= --loss.beta and "
                                                     "--list-loss.beta)"),
    "rpo_alpha": (("loss.rpo_alpha",), float, "= --loss.rpo-alpha: add alpha * NLL(chosen) (RPO)"),
    "max_length": (("tokenize.max_length",), int, "= --tokenize.max-length: max prompt + completion tokens"),
    "prefix_as_prompt": (("tokenize.prefix_as_prompt",), bool, "= --tokenize.prefix-as-prompt: score only the "
                                                               "part after shared_prefix"),
}


def _shortcut_params() -> list[inspect.Parameter]:
    params = []
    for name, (_, t, help_) in SHORTCUTS.items():
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if t is bool else [flag]
        params.append(inspect.Parameter(f"short__{name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[t],
                                        default=typer.Option(None, *decls, help=help_,
                                                             rich_help_panel="Shortcuts")))
    return params


def overrides(options: dict) -> dict:
    """Command-line options (None = not given) -> nested TrainConfig fields; a full name wins over a shortcut."""
    short: dict = {}
    for name, (paths, _, _) in SHORTCUTS.items():
        value = options.pop(f"short__{name}", None)
        if value is None:
            continue
        if name == "loss_type":
            value = parse_value(value)
        for path in paths:
            section, field = path.split(".")
            short.setdefault(section, {})[field] = value
    return merge(short, collect(options, TrainConfig))


def _output_dir_short_flag(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    # `-o` for --output-dir, as stage commands have it for --run-dir
    for p in params:
        if p.name == "output_dir":
            p.default.param_decls = (*p.default.param_decls, "-o")
    return params


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    def train_cmd(config: Optional[Path] = None, **options) -> None:
        """Train the policy on preference pairs (DPO and friends), ranked lists, or SFT, or a reward model
        (--mode reward); writes OUTPUT_DIR/{metrics.jsonl, final/, train_summary.json}."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from pipeline.train.config import load_config
        from pipeline.train.launch import make_trainer

        cfg = load_config(config, overrides(options))
        result = make_trainer(cfg).train()
        if cfg.distributed != "none":  # under torchrun: end the process group on every rank together
            from pipeline.distributed.ddp import close
            close()
        last = result.history[-1] if result.history else {}
        shown = {k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                      "logps/rejected", "grad_norm", "accuracy", "eval/accuracy", "eval/margin")
                 if k in last}
        typer.echo(json.dumps({"steps": result.steps, "output_dir": str(result.output_dir),
                               "reference_cache_reused": result.ref_reused, "last": shown}))

    config_param = inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],
                                     default=typer.Argument(None, help="YAML/JSON TrainConfig; options override it"))
    fields = _output_dir_short_flag(model_options(TrainConfig, panel="Training", nested=True, lists=True))
    train_cmd.__signature__ = inspect.Signature([config_param, *_shortcut_params(), *fields])
    app.command("train")(train_cmd)
