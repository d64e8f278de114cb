"""The Prefect flow: each step of a run config is a task that passes run-directory paths, never data.

Tasks retry on backend errors (a flaky server, a crashed worker); everything else fails fast with the error's
message. The run report is published as a Prefect markdown artifact. `run_local` executes the same steps in
the same order without Prefect (the CLI's `--no-prefect`, and bench/flow's baseline).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import parallel, steps
from flows.config import load_run_config
from flows.rerun import check_rerun
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
    return _heavy("train_step", config_path, arm)


@task(name="eval", retries=1, retry_condition_fn=_retry_backend_errors, task_run_name="eval-{label}", **_TASK)
def eval_task(config_path: str, model: str, label: str) -> str:
    return _heavy("eval_step", config_path, model, label)


def _heavy(step: str, config_path: str, *args) -> str:
    """A training arm or an eval: in this process, or with `workers` > 1 in one of the run's pool processes."""
    cfg, _ = load_run_config(config_path)
    if cfg.workers > 1:
        return parallel.in_worker(cfg, steps.run_named, step, config_path, *args)
    return str(getattr(steps, step)(cfg, *args))


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


def _call(cfg, key: str) -> tuple:
    """The step function and its arguments after the config path, for a key of `parallel.plan`."""
    kind, _, name = key.partition(":")
    if kind == "eval":
        return "eval", (dict(steps.model_labels(cfg))[name], name)
    return kind, ((name,) if name else ())


@flow(name="prefpipe", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64))
def prefpipe_flow(config_path: str) -> dict:
    """Run a prefpipe run config: inputs → baseline eval → stages → training arms → evals → report → export.
    With `workers` > 1 every step is submitted once the steps it reads are done (flows/parallel.py)."""
    cfg, base = load_run_config(config_path)
    check_rerun(cfg, base, config_path)  # a changed step of an existing run folder: refused before any step runs
    tasks = {"inputs": inputs_task, "eval": eval_task, "stage": stage_task, "train": train_task,
             "report": report_task, "export": export_task}
    out, futures = {}, {}
    if cfg.workers > 1:
        parallel.preload()
    try:
        for key, deps in parallel.plan(cfg):
            kind, args = _call(cfg, key)
            if cfg.workers > 1:
                futures[key] = tasks[kind].submit(config_path, *args, wait_for=[futures[d] for d in deps])
            else:
                out[key] = tasks[kind](config_path, *args)
        out.update({k: f.result() for k, f in futures.items()})
    finally:
        parallel.shutdown()
    return out


def run_local(config_path: str) -> dict:
    """The same steps in the same order (with `workers` > 1: the same dependencies), without Prefect."""
    cfg, base = load_run_config(config_path)
    check_rerun(cfg, base, config_path)
    run = {"inputs": lambda: str(steps.prepare_inputs(cfg, base)),
           "stage": lambda name: str(steps.run_stage_step(cfg, name, progress=not steps.no_progress())),
           "train": lambda arm: _heavy("train_step", config_path, arm),
           "eval": lambda model, label: _heavy("eval_step", config_path, model, label),
           "report": lambda: str(steps.report_step(cfg, Path(config_path))),
           "export": lambda: str(steps.export_step(cfg))}
    plan = parallel.plan(cfg)
    try:
        if cfg.workers == 1:
            return {key: run[kind](*args) for key, (kind, args) in ((k, _call(cfg, k)) for k, _ in plan)}
        futures: dict = {}
        parallel.preload()
        with ThreadPoolExecutor(len(plan)) as ex:
            for key, deps in plan:
                kind, args = _call(cfg, key)
                futures[key] = ex.submit(_after, [futures[d] for d in deps], run[kind], *args)
            return {k: f.result() for k, f in futures.items()}
    finally:
        parallel.shutdown()


def _after(deps: list, fn, *args):
    for d in deps:
        d.result()  # re-raises a failed dependency's error instead of running on its missing output
    return fn(*args)
