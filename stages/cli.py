"""Registers `prefpipe stage NAME` for every stage module (and for plugin modules named in
PREFPIPE_STAGE_MODULES, comma-separated, so users can add their own stages)."""
from __future__ import annotations

import importlib
import os

import typer

from pipeline.stage import get_stage, list_stages
from pipeline.stage_cli import register_stage_commands

STAGE_MODULES = ["stages.select", "stages.sample_pairs", "stages.tree_search", "stages.mine_trees", "stages.rationales",
                 "stages.reward_relabel", "stages.deliberation", "stages.intervention", "stages.self_label"]


def load_stage_modules() -> None:
    extra = [m.strip() for m in os.environ.get("PREFPIPE_STAGE_MODULES", "").split(",") if m.strip()]
    for name in STAGE_MODULES + extra:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    load_stage_modules()
    register_stage_commands(stage_app, [get_stage(n) for n in list_stages()])
