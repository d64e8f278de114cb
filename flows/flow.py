"""The Prefect flow: each step of a run config is a task that passes run-directory paths, never data.

Tasks retry on backend errors (a flaky server, a crashed worker); everything else fails fast with the error's
message. The run report is published as a Prefect markdown artifact. `run_local` executes the same steps in
the same order without Prefect (the CLI's `--no-prefect`, and bench/flow's baseline).
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import steps
from flows.config import load_run_config
from schemas.errors import BackendError


def _retry_backend_errors(task_, task_run, state) -> bool:
    try:
        state.result()
    except BackendError:
        return True
    except Exception:
        return False
    return False


_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="inputs", **_TASK)
def inputs_task(config_path: str) -> str:
    cfg, base = load_run_config(config_path)
    return str(steps.prepare_inputs(cfg, base))


@task(name="stage", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_backend_errors,
      task_run_name="stage-{stage_id}", **_TASK)
def stage_task(config_path: str, stage_id: str) -> str:
    cfg, _ = load_run_config(config_path)
    return str(steps.run_stage_step(cfg, stage_id, progress=not steps.no_progress()))


@task(name="train", task_run_name="train-{arm}", **_TASK)
def train_task(config_path: str, arm: str) -> str:
    cfg, _ = load_run_config(config_path)
    return str(steps.train_step(cfg, arm))


@task(name="eval", retries=1, retry_condition_fn=_retry_backend_errors, task_run_name="eval-{label}", **_TASK)
def eval_task(config_path: str, model: str, label: str) -> str:
    cfg, _ = load_run_config(config_path)
    return str(steps.eval_step(cfg, model, label))


@task(name="report", **_TASK)
def report_task(config_path: str) -> str:
    cfg, base = load_run_config(config_path)
    out = steps.report_step(cfg, Path(config_path))
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=(out / "report.md").read_text(), key=_artifact_key(cfg.name),
                             description=f"prefpipe run report: {cfg.name}")
    return str(out)


@task(name="export", retries=2, retry_delay_seconds=10, **_TASK)
def export_task(config_path: str) -> str:
    cfg, _ = load_run_config(config_path)
    return str(steps.export_step(cfg))


def _artifact_key(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]", "-", f"prefpipe-report-{name}".lower())


@flow(name="prefpipe", log_prints=True)
def prefpipe_flow(config_path: str) -> dict:
    """Run a prefpipe run config: inputs → baseline eval → stages → training arms → evals → report → export."""
    cfg, _ = load_run_config(config_path)
    out = {"inputs": inputs_task(config_path)}
    if cfg.eval:
        out["eval:base"] = eval_task(config_path, cfg.model, "base")
    for s in cfg.stages:
        if s.phase == "generate":
            out[f"stage:{s.folder}"] = stage_task(config_path, s.folder)
    for arm in cfg.train:
        out[f"train:{arm.name}"] = train_task(config_path, arm.name)
    for s in cfg.stages:
        if s.phase == "post_train":
            out[f"stage:{s.folder}"] = stage_task(config_path, s.folder)
    if cfg.eval:
        for label, model in steps.model_labels(cfg)[1:]:
            out[f"eval:{label}"] = eval_task(config_path, model, label)
    if cfg.report:
        out["report"] = report_task(config_path)
    if cfg.export:
        out["export"] = export_task(config_path)
    return out


def run_local(config_path: str) -> dict:
    """The same steps in the same order, without Prefect."""
    cfg, base = load_run_config(config_path)
    out = {"inputs": str(steps.prepare_inputs(cfg, base))}
    if cfg.eval:
        out["eval:base"] = str(steps.eval_step(cfg, cfg.model, "base"))
    for phase in ("generate", "post_train"):
        if phase == "post_train":
            for arm in cfg.train:
                out[f"train:{arm.name}"] = str(steps.train_step(cfg, arm.name))
        for s in cfg.stages:
            if s.phase == phase:
                out[f"stage:{s.folder}"] = str(steps.run_stage_step(cfg, s.folder,
                                                                    progress=not steps.no_progress()))
    if cfg.eval:
        for label, model in steps.model_labels(cfg)[1:]:
            out[f"eval:{label}"] = str(steps.eval_step(cfg, model, label))
    if cfg.report:
        out["report"] = str(steps.report_step(cfg, Path(config_path)))
    if cfg.export:
        out["export"] = str(steps.export_step(cfg))
    return out
