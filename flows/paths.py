"""Where a run's files live: the run directory and each model's folder (read by the steps and by the report)."""
from __future__ import annotations

from pathlib import Path

from flows.config import RunConfig


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir)


def model_labels(cfg: RunConfig) -> list[tuple[str, str]]:
    """(label, model path) for the base model and every training arm's final model."""
    labels = [("base", cfg.model)]
    labels += [(arm.name, str(run_dir(cfg) / "train" / arm.name / "final")) for arm in cfg.train]
    return labels
