"""Build a `prefpipe stage NAME` command for every registered stage.

Each config field becomes an option (`--expansion-width 3`); lists and nested values come from `--config
FILE.yaml`; options given on the command line override the file.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.config_io import read_config, validate
from pipeline.config_options import model_options
from pipeline.stage import StageSpec
from schemas.errors import InputError


def load_config(spec: StageSpec, config_file: Path | None, overrides: dict[str, Any]):
    """The stage's config from `config_file` (YAML/JSON, optional) with `overrides` (None = not given) on top."""
    data: dict[str, Any] = read_config(config_file, f"config of stage '{spec.name}'") if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    file = str(config_file) if config_file else "<command line>"
    cfg = validate(spec.config, data, file=file, what=f"config of stage '{spec.name}'")
    # `@ARM` names a training arm of a run config (flows resolve it to the arm's folder); a single stage command
    # has no arms, so the reference would only fail when the first node is scored, after the policy loaded.
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, str) and value.startswith("@") and name.endswith("_model"):
            raise InputError(f"{value!r} names a run config's training arm; a stage command takes a model folder",
                             file=file, column=name)
    return cfg


def check_common(common: dict[str, Any]) -> None:
    """The engine options are settings like the config's: in range before anything loads or runs."""
    bounds = {"fail_threshold": (0.0, 1.0), "shard_size": (1, None), "replicas": (1, None)}
    for name, (low, high) in bounds.items():
        value = common[name]
        if not (value >= low and (high is None or value <= high)):  # `not >=` also catches nan
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise InputError(f"must be {span}, got {value}", file="<command line>",
                             column="--" + name.replace("_", "-"))


def make_stage_command(spec: StageSpec):
    """A typer-compatible function whose signature lists the stage's options."""
    field_params = model_options(spec.config, panel="Stage config")

    def command(**kwargs):
        from pipeline.engine import read_input, run_stage, stage_fingerprint
        from pipeline.store import RunStore
        from schemas import validate as validate_input

        common = {k: kwargs.pop(k) for k in list(kwargs) if k in _COMMON}
        check_common(common)
        cfg = load_config(spec, common["config"], kwargs)
        if spec.needs_backend:  # a stage that scores text cannot run on a chat-only server: say so before loading
            from pipeline.judges.config import check_stage_logprobs
            check_stage_logprobs(spec.name, cfg, common["backend"], common["model"], file="<command line>",
                                 column="--backend")
        rows, store = None, RunStore(common["run_dir"])
        if not common["print_fingerprint"]:  # bad input or output fails here, before a model loads (seconds)
            rows = validate_input(read_input(common["input"], spec.input_kind), spec.input_kind,
                                  file=str(common["input"]))
            store.check_writable()
        backend = None
        if spec.needs_backend and not (common["ray"] and not common["print_fingerprint"]):  # Ray: one per actor
            from pipeline.backends import make_backend
            backend = make_backend(common["backend"], common["model"], base_url=common["base_url"])
        try:
            if common["print_fingerprint"]:
                fp, inputs = stage_fingerprint(spec, cfg, backend)
                typer.echo(json.dumps({"fingerprint": fp, "inputs": inputs}, indent=1, sort_keys=True))
                return
            run = run_stage
            if common["ray"]:
                from pipeline.distributed.ray_runner import ray_stage_runner
                run = ray_stage_runner(common["ray"], common["replicas"], common["backend"], common["model"],
                                       base_url=common["base_url"])
            res = run(spec, rows, cfg, backend, store,
                            shard_size=common["shard_size"], fail_threshold=common["fail_threshold"],
                            overwrite=common["overwrite"], input_file=str(common["input"]))
        finally:
            if backend is not None and hasattr(backend, "close"):
                backend.close()
        typer.echo(json.dumps({"stage": spec.name, "dir": str(res.store.dir), **res.summary}, indent=1))

    common_params = [
        inspect.Parameter("input", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
            ..., "--input", "-i", help="Input: a prompts file (JSONL, Parquet, datasets folder) or a stage "
                                       "folder of a run directory.")),
        inspect.Parameter("run_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
            ..., "--run-dir", "-o", help="Run directory; the stage writes <run-dir>/<stage>/.")),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", "-c", help="YAML file of config fields.")),
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("tiny-policy", help="Model name or local folder.")),
        inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("transformers", help="transformers | vllm | http")),
        inspect.Parameter("base_url", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, help="Server URL for the http backend.")),
        inspect.Parameter("shard_size", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                          default=typer.Option(64, help="Input rows per shard (the unit of resume).")),
        inspect.Parameter("fail_threshold", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                          default=typer.Option(0.01, help="Fail the run above this share of failed rows.")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="Discard an existing stage folder of another config.")),
        inspect.Parameter("print_fingerprint", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="Print what goes into the fingerprint and exit.")),
        inspect.Parameter("ray", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, help="Compute shards on Ray actors: 'local' or a cluster address (ray.init); the run store "
                       "merges them.")),
        inspect.Parameter("replicas", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
            2, help="With --ray: actors, one backend replica each (1 GPU each when the cluster has GPUs).")),
    ]
    command.__signature__ = inspect.Signature(common_params + field_params)
    command.__doc__ = spec.help or f"Run the {spec.name} stage."
    return command


_COMMON = {"input", "run_dir", "config", "model", "backend", "base_url", "shard_size", "fail_threshold",
           "overwrite", "print_fingerprint", "ray", "replicas"}


# The example under each stage command's --help reads the stage's input kind (else: a stage folder of pairs).
_EXAMPLE_INPUTS = {"prompts": "prompts.jsonl", "trees": "runs/demo/tree@trees"}


def register_stage_commands(stage_app: typer.Typer, specs: list[StageSpec]) -> None:
    for spec in specs:
        example = (f"Example: prefpipe stage {spec.name} -i {_EXAMPLE_INPUTS.get(spec.input_kind, 'runs/demo/tree')} "
                   f"-o runs/demo")
        stage_app.command(spec.name, epilog=example)(make_stage_command(spec))
