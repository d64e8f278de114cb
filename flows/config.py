"""The YAML run config a flow (or `prefpipe run`) executes: inputs, stages, training arms, eval, report, export.

    name: demo
    output_dir: runs/demo
    model: tiny-policy
    backend: transformers
    inputs: {task: {preset: tiny, split: train, n: 200}}     # or {file: prompts.jsonl}
    stages:
      - {id: tree, stage: tree-search, input: inputs, config: {...}, shard_size: 16}
    train:
      - {name: tree-rpo, data: tree, config: {loss: {loss_type: sigmoid, rpo_alpha: 1.0}, lr: 3e-5}}
    eval: {task: {preset: tiny, split: eval, n: 1000}}
    report: true
    export: {out: export}

Relative paths are resolved against the config file's folder (output_dir against the working directory).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskInput(_Strict):
    preset: Literal["tiny", "default"] = Field("tiny", description="TaskConfig preset of the bundled task")
    split: Literal["train", "eval"] = "train"
    n: int = Field(200, ge=1, description="problems to take from the split")
    overrides: dict[str, Any] = Field(default_factory=dict, description="TaskConfig fields to override")


class Inputs(_Strict):
    task: TaskInput | None = Field(None, description="use the bundled arithmetic task")
    file: str | None = Field(None, description="or a prompts file: JSONL, Parquet or a datasets folder")
    limit: int | None = Field(None, ge=1, description="take only the first N prompts of the file")

    @model_validator(mode="after")
    def _one(self) -> "Inputs":
        if (self.task is None) == (self.file is None):
            raise ValueError("inputs needs exactly one of `task` or `file`")
        return self


class StageStep(_Strict):
    id: str | None = Field(None, description="folder name in the run directory (default: the stage name)")
    stage: str = Field(..., description="registered stage name, e.g. tree-search")
    input: str = Field("inputs", description="`inputs`, or the id of an earlier stage (its main output); "
                                             "`id@output` for another output")
    config: dict[str, Any] = Field(default_factory=dict)
    shard_size: int = Field(32, ge=1)
    fail_threshold: float = Field(0.01, ge=0, le=1)
    model: str | None = Field(None, description="override the run's model for this stage; `@ARM` = that "
                                                "training arm's final model (needs phase post_train)")
    phase: Literal["generate", "post_train"] = Field(
        "generate", description="generate: before training; post_train: after the training arms (e.g. SPA "
                                "self-labels from a DPO-trained policy)")
    backend: str | None = None

    @property
    def folder(self) -> str:
        return self.id or self.stage


class TrainArm(_Strict):
    name: str = Field(..., description="arm name; the model goes to <output_dir>/train/<name>")
    data: str = Field(..., description="stage id whose pairs/lists to train on (`id@lists` for ranked lists)")
    config: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields")
    role: Literal["treatment", "baseline", "control"] = Field(
        "treatment", description="how the report labels this arm")


class EvalStep(_Strict):
    task: TaskInput = Field(default_factory=lambda: TaskInput(split="eval", n=1000))
    batch_size: int = Field(64, ge=1)
    max_tokens: int = Field(192, ge=1, description="new tokens per eval answer")
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples for Δ intervals")
    compare_with: dict[str, str] = Field(
        default_factory=dict, description="label -> eval JSON of another run (`<output_dir>/eval/<arm>.json`, "
        "relative to the working directory) on the same eval problems; the report compares every arm with it "
        "(paired, like a baseline arm) and errors when its problems differ")
    pools: dict[str, list[str]] = Field(
        default_factory=dict, description="pool label -> models (`base`, arm names, compare_with labels), e.g. "
        "the seeds of one setting; the report compares each pool with every earlier one and with base on the "
        "per-problem mean accuracy over its models (paired bootstrap over problems)")


class ExportStep(_Strict):
    out: str = Field("export", description="export folder (relative to output_dir)")
    repo: str | None = Field(None, description="push to this Hub dataset repo when set")
    private: bool = True


class RunConfig(_Strict):
    name: str = "run"
    output_dir: str = "runs/run"
    model: str = "tiny-policy"
    backend: Literal["transformers", "vllm", "http"] = "transformers"
    base_url: str | None = None
    threads: int | None = Field(None, ge=1, description="torch CPU threads for every step")
    inputs: Inputs
    stages: list[StageStep] = Field(default_factory=list)
    train: list[TrainArm] = Field(default_factory=list)
    eval: EvalStep | None = None
    report: bool = True
    export: ExportStep | None = None

    @model_validator(mode="after")
    def _refs(self) -> "RunConfig":
        seen = {"inputs"}
        for s in self.stages:
            if s.input.split("@")[0] not in seen:
                raise ValueError(f"stage {s.folder!r}: input {s.input!r} is not `inputs` or an earlier stage id")
            if s.folder in seen:
                raise ValueError(f"duplicate stage id {s.folder!r}")
            seen.add(s.folder)
        post = {s.folder for s in self.stages if s.phase == "post_train"}
        for s in self.stages:
            if s.phase == "generate" and s.input.split("@")[0] in post:
                raise ValueError(f"stage {s.folder!r} runs before training but reads post_train stage {s.input!r}")
        for a in self.train:
            if a.data.split("@")[0] in post:
                raise ValueError(f"train arm {a.name!r} reads post_train stage {a.data!r}")
        arms = {a.name for a in self.train}
        for s in self.stages:
            if s.model and s.model.startswith("@") and (s.model[1:] not in arms or s.phase != "post_train"):
                raise ValueError(f"stage {s.folder!r}: model {s.model!r} needs a training arm of that name and "
                                 f"phase: post_train")
        for arm in self.train:
            if arm.data.split("@")[0] not in seen:
                raise ValueError(f"train arm {arm.name!r}: data {arm.data!r} is not a stage id")
        names = [a.name for a in self.train]
        if len(set(names)) != len(names):
            raise ValueError("train arm names must be unique")
        known = {"base", *names, *(self.eval.compare_with if self.eval else {})}
        for pool, members in (self.eval.pools if self.eval else {}).items():
            unknown = [m for m in members if m not in known]
            if unknown or not members:
                raise ValueError(f"eval pool {pool!r}: {unknown or 'no models'} not base, a train arm or a "
                                 f"compare_with label")
        return self

    def stage(self, stage_id: str) -> StageStep:
        for s in self.stages:
            if s.folder == stage_id:
                return s
        raise KeyError(stage_id)


def load_run_config(path: str | Path) -> tuple[RunConfig, Path]:
    """Read and check a run config; returns it and the folder relative paths resolve against."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError("no such run config", file=str(path)) from None
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise InputError("a run config is a mapping", file=str(path))
    try:
        cfg = RunConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(err["msg"], file=str(path), column=".".join(str(p) for p in err["loc"])) from None
    return cfg, path.resolve().parent
