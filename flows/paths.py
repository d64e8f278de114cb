"""Where a run's files live: the run directory and each model's folder (read by the steps and by the report)."""
from __future__ import annotations

from pathlib import Path

from flows.config import RunConfig, policy_arms


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir)


def model_labels(cfg: RunConfig) -> list[tuple[str, str]]:
    """(label, model path) for the base model and every policy arm's final model (reward arms are no policies)."""
    labels = [("base", cfg.model)]
    labels += [(arm.name, str(arm_folder(cfg, arm.name))) for arm in policy_arms(cfg)]
    return labels


def arm_folder(cfg: RunConfig, arm: str) -> Path:
    """A training arm's final model: what `@ARM` (a stage's `model` or `value_model`) stands for."""
    return run_dir(cfg) / "train" / arm / "final"
