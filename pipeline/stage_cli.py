"""Build a `prefpipe stage NAME` command for every registered stage.

Each config field becomes an option (`--expansion-width 3`); lists and nested values come from `--config
FILE.yaml`; options given on the command line override the file.
"""
from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import ValidationError

from pipeline.stage import StageSpec
from schemas.errors import InputError

_SIMPLE = (int, float, str, bool)


def _option_type(annotation: Any) -> type | None:
    """The click-friendly type of a config field, or None when it only comes from the YAML file."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _option_type(args[0]) if len(args) == 1 else None
    return annotation if annotation in _SIMPLE else None


def load_config(spec: StageSpec, config_file: Path | None, overrides: dict[str, Any]):
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"cannot read config: {e}", file=str(config_file)) from None
        if not isinstance(data, dict):
            raise InputError("config must be a mapping of field: value", file=str(config_file))
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return spec.config(**data)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"{err['msg']} (config of stage '{spec.name}')",
                         file=str(config_file) if config_file else "<command line>",
                         column=".".join(str(p) for p in err["loc"])) from None


def make_stage_command(spec: StageSpec):
    """A typer-compatible function whose signature lists the stage's options."""
    field_params = []
    for name, field in spec.config.model_fields.items():
        t = _option_type(field.annotation)
        if t is None:
            continue
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if t is bool else [flag]
        field_params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[t],
            default=typer.Option(None, *decls, help=f"{field.description or ''} [default: {field.default}]",
                                 rich_help_panel="Stage config")))

    def command(**kwargs):
        from pipeline.engine import read_input, run_stage, stage_fingerprint
        from pipeline.store import RunStore

        common = {k: kwargs.pop(k) for k in list(kwargs) if k in _COMMON}
        cfg = load_config(spec, common["config"], kwargs)
        backend = None
        if spec.needs_backend and not (common["ray"] and not common["print_fingerprint"]):  # Ray: one per actor
            from pipeline.backends import make_backend
            backend = make_backend(common["backend"], common["model"], base_url=common["base_url"])
        try:
            if common["print_fingerprint"]:
                fp, inputs = stage_fingerprint(spec, cfg, backend)
                typer.echo(json.dumps({"fingerprint": fp, "inputs": inputs}, indent=1, sort_keys=True))
                return
            rows = read_input(common["input"], spec.input_kind)
            run = run_stage
            if common["ray"]:
                from pipeline.distributed.ray_runner import ray_stage_runner
                run = ray_stage_runner(common["ray"], common["replicas"], common["backend"], common["model"],
                                       base_url=common["base_url"])
            res = run(spec, rows, cfg, backend, RunStore(common["run_dir"]),
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


def register_stage_commands(stage_app: typer.Typer, specs: list[StageSpec]) -> None:
    for spec in specs:
        stage_app.command(spec.name)(make_stage_command(spec))
