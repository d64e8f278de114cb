"""`prefpipe train [CONFIG.yaml] [options]`: train on a pair / ranked-list table and write the output folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer


def _overrides(**opts) -> dict:
    """CLI options -> nested TrainConfig fields (None = not given)."""
    out: dict = {}
    nested = {"loss_type": ("loss", "loss_type"), "beta": ("loss", "beta"), "rpo_alpha": ("loss", "rpo_alpha"),
              "max_length": ("tokenize", "max_length"), "prefix_as_prompt": ("tokenize", "prefix_as_prompt")}
    for key, value in opts.items():
        if value is None:
            continue
        if key == "loss_type" and "," in value:
            value = [t.strip() for t in value.split(",") if t.strip()]
        if key in nested:
            section, field = nested[key]
            out.setdefault(section, {})[field] = value
        else:
            out[key] = value
    return out


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: Optional[Path] = typer.Argument(None, help="YAML TrainConfig; options below override it"),
        model: Optional[str] = typer.Option(None, help="policy folder or built-in name (tiny-policy)"),
        data: Optional[str] = typer.Option(None, help="pair / ranked-list table (.parquet, folder, .jsonl)"),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o"),
        mode: Optional[str] = typer.Option(None, help="preference | sft"),
        sft_column: Optional[str] = typer.Option(None, help="mode sft: the column to train on (e.g. gold)"),
        loss_type: Optional[str] = typer.Option(
            None, help="pairwise loss, e.g. sigmoid, ipo, apo_zero; several as sigmoid,sft"),
        beta: Optional[float] = typer.Option(None),
        rpo_alpha: Optional[float] = typer.Option(None, help="add alpha * NLL(chosen) (RPO)"),
        lr: Optional[float] = typer.Option(None),
        epochs: Optional[float] = typer.Option(None),
        max_steps: Optional[int] = typer.Option(None),
        micro_batch: Optional[int] = typer.Option(None),
        grad_accum: Optional[int] = typer.Option(None),
        max_length: Optional[int] = typer.Option(None),
        prefix_as_prompt: Optional[bool] = typer.Option(None, "--prefix-as-prompt/--no-prefix-as-prompt"),
        share_prompt: Optional[bool] = typer.Option(None, "--share-prompt/--no-share-prompt",
                                                    help="run the prompt once per pair (block attention mask)"),
        gradient_checkpointing: Optional[bool] = typer.Option(
            None, "--gradient-checkpointing/--no-gradient-checkpointing"),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
        seed: Optional[int] = typer.Option(None),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
    ) -> None:
        """Train the policy on preference pairs (DPO and friends), ranked lists, or SFT; writes
        OUTPUT_DIR/{metrics.jsonl, final/, train_summary.json}."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from pipeline.train.config import load_config
        from pipeline.train.launch import make_trainer

        cfg = load_config(config, _overrides(
            model=model, data=data, output_dir=output_dir, mode=mode, sft_column=sft_column, loss_type=loss_type,
            beta=beta, rpo_alpha=rpo_alpha, lr=lr, epochs=epochs, max_steps=max_steps, micro_batch=micro_batch,
            grad_accum=grad_accum, max_length=max_length, prefix_as_prompt=prefix_as_prompt, device=device,
            seed=seed, progress=progress, share_prompt=share_prompt, gradient_checkpointing=gradient_checkpointing))
        result = make_trainer(cfg).train()
        if cfg.distributed != "none":  # under torchrun: end the process group on every rank together
            from pipeline.distributed.ddp import close
            close()
        last = result.history[-1] if result.history else {}
        shown = {k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                      "logps/rejected", "grad_norm") if k in last}
        typer.echo(json.dumps({"steps": result.steps, "output_dir": str(result.output_dir),
                               "reference_cache_reused": result.ref_reused, "last": shown}))
