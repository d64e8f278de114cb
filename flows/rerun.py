"""A rerun into an existing run folder, checked before any step runs.

Resume is by fingerprint: a stage folder started under one configuration refuses another (pipeline/store.py), and
one started on N input rows refuses a different N (pipeline/engine.py). Those checks fire when the stage starts,
which in a long run is after the earlier steps have spent their time. This module makes the same comparisons up
front, from what the folders already record, so a changed `config`, `skip` or `limit` of any stage step (or a
changed `inputs` section) exits 2 before a model loads. It only refuses what the stage itself would refuse: the
comparison leaves out the model, which is known only once it loads, and the row count is compared only where it
is known without running anything (the run's prompts, or a finished upstream stage).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from flows.config import RunConfig
from flows.paths import run_dir
from flows.steps import check_inputs, stage_config
from pipeline.fingerprint import canonical_json
from pipeline.store import RunStore
from schemas.errors import InputError

# the parts of a stage's fingerprint that come from its config (the rest names the model and its weights)
CONFIG_PARTS = ("stage", "version", "config", "sampling", "templates")


def check_rerun(cfg: RunConfig, base: Path, file: str) -> None:
    """Refuse, naming the step and what changed, a rerun whose stage steps no longer match their folders."""
    from pipeline.engine import stage_fingerprint
    from pipeline.stage import get_stage
    from stages.catalog import load_stage_modules

    root = run_dir(cfg)
    if not root.exists():
        return
    check_inputs(cfg, base)
    load_stage_modules()
    store = RunStore(root)
    for i, step in enumerate(cfg.stages):
        st = store.stage(step.folder)
        if not st.exists():
            continue
        manifest = st.manifest()
        recorded = manifest.get("fingerprint_inputs") or {}
        _, now = stage_fingerprint(get_stage(step.stage), stage_config(cfg, step), None)
        changed = sorted(_changed(recorded.get("config") or {}, now["config"]) |
                         {p for p in CONFIG_PARTS if p != "config" and
                          canonical_json(recorded.get(p)) != canonical_json(now[p])})
        if changed:
            raise InputError(f"stage step {step.folder!r} was started in {st.dir} with another configuration "
                             f"({', '.join(changed)} changed); use a new output_dir, or delete {st.dir} and "
                             "the steps built on it", file=file, column=f"stages.{i}.config")
        rows = _input_rows(store, root, step.input)
        if rows is None:
            continue
        n = max(0, rows - step.skip) if step.limit is None else max(0, min(rows - step.skip, step.limit))
        if n != manifest["n_input_rows"]:
            raise InputError(f"stage step {step.folder!r} was started in {st.dir} on {manifest['n_input_rows']} "
                             f"input rows; with this config's input, skip and limit it would read {n}; use a new "
                             f"output_dir, or delete {st.dir} and the steps built on it", file=file,
                             column=f"stages.{i}.{_selection(step)}")


def _selection(step) -> str:
    """The field of a step that chose its rows, to name in the error: limit, else skip, else input."""
    return "limit" if step.limit is not None else "skip" if step.skip else "input"


def _changed(recorded: dict, now: dict) -> set[str]:
    """The config fields whose recorded and current values differ (a field present on one side only counts)."""
    return {k for k in recorded.keys() | now.keys()
            if canonical_json(recorded.get(k, "<unset>")) != canonical_json(now.get(k, "<unset>"))}


def _input_rows(store: RunStore, root: Path, ref: str) -> int | None:
    """How many rows a step's input gives it before skip/limit, when that is known without running anything:
    the run's prompts, or the ok rows of a finished upstream stage (what flows.steps.stage_input reads)."""
    if ref == "inputs":
        path = root / "inputs" / "prompts.parquet"
        return pq.read_metadata(path).num_rows if path.exists() else None
    stage_id, _, output = ref.partition("@")
    up = store.stage(stage_id)
    if not up.exists():
        return None
    m = up.manifest()
    status = (m.get("summary") or {}).get("status") or {}
    if not m.get("complete") or (output or "main") not in status:  # unfinished, or counts not recorded
        return None
    return status[output or "main"].get("ok", 0)
