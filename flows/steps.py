"""The steps of a run as plain functions that take and return paths (the flow wraps each in a Prefect task;
`prefpipe run --no-prefect` calls them directly). All data lives in the run directory; nothing is passed in
memory between steps, so a rerun after a crash reuses every finished shard, model and eval file.

    <output_dir>/inputs/prompts.parquet     the prompts (bundled task or a user file)
    <output_dir>/<stage id>/                stage shards + manifest (the run store)
    <output_dir>/train/<arm>/final/         trained models; metrics.jsonl beside them
    <output_dir>/eval/<model>.json          accuracy, interval, per-problem correctness
    <output_dir>/report/                    report.md, summary.json, PNG plots
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flows.backend_cache import backend_for
from flows.config import RunConfig, TaskInput, TaskSource, arm_fields, arm_ref
from flows.paths import arm_folder, model_labels, run_dir  # noqa: F401  (model_labels: steps.model_labels for the flow)
from pipeline.store import RunStore, atomic_write_bytes, atomic_write_table
from pipeline.threads import set_threads
from schemas.errors import InputError


def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


def task_problems(t: TaskInput) -> list[dict]:
    """The bundled task's split a `{preset, split, n, overrides}` section names, as problem rows."""
    from pipeline.tasks.registry import get_task

    return get_task("arith", preset=t.preset, **t.overrides).make(t.n, t.split).to_pylist()


def source_problems(src: TaskSource, default_split: str) -> pa.Table:
    """The problems of a section naming a task (`{task: math, path: ...}`, `{task: reasoning-gym:..., size}`)."""
    from pipeline.tasks.problems import load_problems

    return load_problems(src.task_name, path=src.path, n=src.size, split=src.split or default_split, seed=src.seed,
                         limit=src.limit, prompt_column=src.prompt_column, answer_column=src.answer_column,
                         options=src.options)[1]


def inputs_record(cfg: RunConfig, base: Path) -> dict:
    """What made inputs/prompts.parquet: the config's `inputs` section and, for a file, its sha256 (the path may be
    relative; the content is what matters)."""
    from pipeline.store import file_digest

    record = {"inputs": cfg.inputs.model_dump(mode="json")}
    if cfg.inputs.file is not None and _resolve(base, cfg.inputs.file).is_file():
        record["file_sha256"] = file_digest(_resolve(base, cfg.inputs.file))[1]
    return record


def check_inputs(cfg: RunConfig, base: Path) -> dict:
    """Refuse a run folder whose prompts were made from another `inputs` section or input file; returns the
    record of the current one."""
    out = run_dir(cfg) / "inputs" / "prompts.parquet"
    made_by = out.parent / "inputs.json"
    record = inputs_record(cfg, base)
    if out.exists() and made_by.exists() and json.loads(made_by.read_text()) != record:
        raise InputError(f"the run folder's prompts ({out}) were made from another `inputs` section or input "
                         f"file; use a new output_dir, or delete {out.parent} and the stages built on it",
                         column="inputs")
    return record


def prepare_inputs(cfg: RunConfig, base: Path) -> Path:
    """Write the run's prompts to inputs/prompts.parquet once; a rerun keeps the file if the config's `inputs`
    (and the file it names) are what made it, and refuses otherwise: every stage, arm and eval of the run folder
    was built on those prompts, so silently keeping them under a changed `inputs` would report the old run."""
    out = run_dir(cfg) / "inputs" / "prompts.parquet"
    record = check_inputs(cfg, base)
    if out.exists():
        return out  # a folder written before the record existed keeps its prompts, as it always did
    if cfg.inputs.task_name is not None:
        table = source_problems(cfg.inputs, "train")
    elif cfg.inputs.task is not None:
        from pipeline.tasks.registry import get_task

        t = cfg.inputs.task
        table = get_task("arith", preset=t.preset, **t.overrides).make(t.n, t.split)
    else:
        from pipeline.tasks.loaders import load_prompts

        table = load_prompts(_resolve(base, cfg.inputs.file))
    if cfg.inputs.limit:
        table = table.slice(0, cfg.inputs.limit)
    atomic_write_table(out, table)
    atomic_write_bytes(out.parent / "inputs.json", json.dumps(record, indent=1, sort_keys=True).encode())
    return out


def run_named(step: str, config_path: str, *args) -> str:
    """`<step>(cfg, *args)` on the run config at `config_path`, as a path string: what a pool process of
    flows/parallel.py runs for a training arm or an eval (a module-level function, so it pickles)."""
    from flows.config import load_run_config

    cfg, _ = load_run_config(config_path)
    return str(globals()[step](cfg, *args))


def stage_input(cfg: RunConfig, ref: str) -> tuple[pa.Table, str]:
    if ref == "inputs":
        path = run_dir(cfg) / "inputs" / "prompts.parquet"
        return pq.read_table(path), str(path)
    stage_id, _, output = ref.partition("@")
    st = RunStore(run_dir(cfg)).stage(stage_id)
    table = st.read(output or "main")
    if "status" in table.column_names:  # later stages build on good rows only
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("status"), "ok"))
    return table, str(st.dir)


def stage_config(cfg: RunConfig, step):
    """The stage config a step runs with: its `config`, with `value_model: "@ARM"` resolved to the arm's folder
    (a reward arm of this run, trained before this stage: parallel.plan). Stage modules must be loaded."""
    from pipeline.stage import get_stage

    fields = dict(step.config)
    if arm_ref(fields.get("value_model")):
        fields["value_model"] = str(arm_folder(cfg, arm_ref(fields["value_model"])))
    return get_stage(step.stage).config(**fields)


def run_stage_step(cfg: RunConfig, stage_id: str, *, progress: bool = True) -> Path:
    from pipeline.engine import run_stage
    from pipeline.stage import get_stage
    from stages.catalog import load_stage_modules

    load_stage_modules()
    step = cfg.stage(stage_id)
    spec = get_stage(step.stage)
    stage_cfg = stage_config(cfg, step)
    if cfg.threads:  # else the process keeps what `prefpipe --threads` (or its default) set
        set_threads(cfg.threads)
    backend = None
    if spec.needs_backend:
        model = step.model or cfg.model
        if arm_ref(model):  # a training arm's final model
            model = str(arm_folder(cfg, arm_ref(model)))
        backend = backend_for(step.backend or cfg.backend, model, cfg.base_url)
    rows, source = stage_input(cfg, step.input)
    if step.skip or step.limit:
        rows = rows.slice(step.skip, step.limit)
    runner = None
    if cfg.workers > 1 and (step.backend or cfg.backend) == "transformers":  # a server batches on its own
        from flows.parallel import shard_runner

        runner = shard_runner(cfg, (step.backend or cfg.backend, model, cfg.base_url) if backend else None)
    res = run_stage(spec, rows, stage_cfg, backend, RunStore(run_dir(cfg)), shard_size=step.shard_size,
                    fail_threshold=step.fail_threshold, input_file=source, progress=progress,
                    folder=step.folder, runner=runner)
    return res.store.dir


def train_step(cfg: RunConfig, arm_name: str) -> Path:
    from pipeline.train.config import TrainConfig
    from pipeline.train.launch import train

    arm = next(a for a in cfg.train if a.name == arm_name)
    out = run_dir(cfg) / "train" / arm.name
    final = out / "final"
    if (final / "model.safetensors").exists() and (out / "train_summary.json").exists():
        return final  # finished in an earlier (crashed) run
    stage_id, _, output = arm.data.partition("@")
    data = run_dir(cfg) / stage_id
    tcfg = TrainConfig(**arm_fields(cfg, arm, data=str(data) + (f"@{output}" if output else ""),
                                    output_dir=str(out)))
    train(tcfg)
    return final


def eval_step(cfg: RunConfig, model: str, label: str) -> Path:
    """Greedy accuracy of `model` on the eval split; writes eval/<label>.json (skipped if present)."""
    from pipeline.evaluate import evaluate_task

    out = run_dir(cfg) / "eval" / f"{label}.json"
    if out.exists():
        return out
    if cfg.threads:  # else the process keeps what `prefpipe --threads` (or its default) set
        set_threads(cfg.threads)
    if cfg.eval.task_name is not None:
        problems = source_problems(cfg.eval, "eval").to_pylist()
    else:
        problems = task_problems(cfg.eval.task)
    backend = backend_for("transformers", str(model), None)
    res = evaluate_task(backend, problems, batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens,
                        progress=None if no_progress() else f"eval {label}")
    res.update({"model": str(model), "label": label})
    atomic_write_bytes(out, json.dumps(res).encode())
    backend_for.cache_clear()
    return out


def report_step(cfg: RunConfig, config_path: Path) -> Path:
    from flows.report import write_report

    return write_report(cfg, config_path)


def export_step(cfg: RunConfig) -> Path:
    from pipeline import hub

    out = run_dir(cfg) / cfg.export.out
    e = cfg.export
    treatment = next((arm.data for arm in cfg.train if arm.role == "treatment" and not arm.is_reward), None)
    # overwrite: the flow's own earlier export (a rerun); only the files it listed are replaced.
    settings = hub.ExportConfig(default_config=e.default_config or treatment, format=e.format,
                                test_fraction=e.test_fraction, seed=e.seed, overwrite=True)
    result = hub.export_run(run_dir(cfg), out, settings, repo_id=cfg.export.repo)
    if cfg.export.repo:
        hub.push_export(result.folder, cfg.export.repo, private=cfg.export.private)
    return result.folder


def no_progress() -> bool:
    return bool(os.environ.get("PREFPIPE_NO_PROGRESS"))
