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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config_io import FiniteFloat, PathComponent, dotted, read_config, validate
from schemas.errors import InputError

Backend = Literal["transformers", "vllm", "http"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskInput(_Strict):
    preset: Literal["tiny", "default"] = Field("tiny", description="TaskConfig preset of the bundled task")
    split: Literal["train", "eval"] = Field("train", description="which seeded split of the bundled task")
    n: int = Field(200, ge=1, description="problems to take from the split")
    overrides: dict[str, Any] = Field(default_factory=dict, description="TaskConfig fields to override")


class TaskSource(_Strict):
    """Where a named task's problems come from: a file (`path`: math, prompts) or its generator (`size` problems
    of `split` under `seed`: arith, reasoning-gym:<dataset>), e.g. {task: math, path: gsm8k.jsonl, limit: 500}
    or {task: "reasoning-gym:chain_sum", size: 2000, seed: 1}. A `task` given as a name lands in `task_name`
    (a mapping stays the bundled task's `{preset, split, n, overrides}` section)."""
    task_name: str | None = Field(None, description="a task name: arith, math, prompts, reasoning-gym:<dataset> "
                                                    "(written `task: NAME`)")
    path: str | None = Field(None, description="with a task name: its problems file (JSONL, Parquet or a "
                                               "datasets folder), relative to the config's folder")
    size: int | None = Field(None, ge=1, description="with a generating task: how many problems to draw")
    seed: int | None = Field(None, description="with a generating task: the split seed (default: the task's)")
    split: Literal["train", "eval"] | None = Field(None, description="with a generating task: the split "
                                                                    "(default: train for inputs, eval for eval)")
    options: dict[str, Any] = Field(default_factory=dict, description="task settings, e.g. reasoning-gym "
                                                                      "generator options {min_terms: 3}")
    prompt_column: str | None = Field(None, description="math: the question column when not a known one")
    answer_column: str | None = Field(None, description="math: the answer column when not a known one")
    limit: int | None = Field(None, ge=1, description="take only the first N prompts")

    @model_validator(mode="before")
    @classmethod
    def _name_of_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("task"), str):
            data = {k: v for k, v in data.items() if k != "task"} | {"task_name": data["task"]}
        return data

    @model_validator(mode="after")
    def _named_only(self) -> "TaskSource":
        if self.task_name is None:
            used = [k for k in ("path", "size", "seed", "split", "options", "prompt_column", "answer_column")
                    if k in self.model_fields_set]
            if used:
                raise ValueError(f"`{used[0]}` goes with a task name (task: math, reasoning-gym:<dataset>, ...)")
        return self


class Inputs(TaskSource):
    task: TaskInput | None = Field(None, description="the bundled arithmetic task ({preset: tiny, ...}) or a "
                                   "task name: arith, math, prompts, reasoning-gym:<dataset>")
    file: str | None = Field(None, description="or a prompts file: JSONL, Parquet or a datasets folder")

    @model_validator(mode="after")
    def _one(self) -> "Inputs":
        if [self.task, self.task_name, self.file].count(None) != 2:
            raise ValueError("inputs needs exactly one of `task` or `file`")
        return self


class StageStep(_Strict):
    id: PathComponent | None = Field(None, description="folder name in the run directory (default: the stage "
                                                       "name)")
    stage: str = Field(..., description="registered stage name, e.g. tree-search")
    input: str = Field("inputs", description="`inputs`, or the id of an earlier stage (its main output); "
                                             "`id@output` for another output")
    config: dict[str, Any] = Field(default_factory=dict, description="the stage's config fields (checked at load)")
    shard_size: int = Field(32, ge=1, description="input rows per shard (the unit of resume)")
    limit: int | None = Field(None, ge=1, description="take only the first N rows of the input (e.g. a baseline "
                                                       "that needs fewer prompts than the run has)")
    skip: int = Field(0, ge=0, description="leave out the first N rows of the input (before `limit`), e.g. a "
                                           "second search on problems the first one did not see")
    fail_threshold: FiniteFloat = Field(0.01, ge=0, le=1, description="fail above this share of failed rows")
    model: str | None = Field(None, description="override the run's model for this stage; `@ARM` = that "
                                                "training arm's final model (needs phase post_train)")
    phase: Literal["generate", "post_train"] = Field(
        "generate", description="generate: before training; post_train: after the training arms (e.g. SPA "
                                "self-labels from a DPO-trained policy)")
    backend: Backend | None = Field(None, description="override the run's backend for this stage")

    @property
    def folder(self) -> str:
        return self.id or self.stage


class TrainArm(_Strict):
    name: PathComponent = Field(..., description="arm name; the model goes to <output_dir>/train/<name>")
    data: str = Field(..., description="stage id whose pairs/lists to train on (`id@lists` for ranked lists)")
    config: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields (checked at load; "
                                   "data and output_dir are the run's)")
    role: Literal["treatment", "baseline", "control"] = Field(
        "treatment", description="how the report labels this arm")

    @property
    def is_reward(self) -> bool:
        """A reward-model arm (`config: {mode: reward}`): a classifier, not a policy. It is not evaluated on the
        task (the report shows its held-out pairwise accuracy); a stage uses it as `value_model: "@NAME"`."""
        return self.config.get("mode") == "reward"


class EvalStep(TaskSource):
    task: TaskInput = Field(default_factory=lambda: TaskInput(split="eval", n=1000),
                            description="the bundled task's split ({preset: tiny, split: eval, n: 1000}) or a task "
                                        "name with path / size (see inputs)")
    batch_size: int = Field(64, ge=1, description="eval problems per generate call")
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
    out: PathComponent = Field("export", description="export folder, one name inside output_dir")
    repo: str | None = Field(None, description="push to this Hub dataset repo when set")
    private: bool = Field(True, description="create the Hub repo private")
    default_config: str | None = Field(None, description="config `load_dataset(export)` loads without a name, or a "
                                       "stage id (default: the data of the first treatment arm)")
    format: Literal["auto", "conversational", "standard"] = Field(
        "auto", description="row format (auto: conversational when the model has a chat template)")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of prompts in a seeded test split")
    seed: int = Field(0, description="seed of the train/test split")


class RunConfig(_Strict):
    name: PathComponent = Field("run", description="run name (Prefect deployment and report artifact)")
    output_dir: str = Field("runs/run", description="the run directory (relative to the working directory)")
    model: str = Field("tiny-policy", description="the policy every stage samples from: a built-in name or a "
                       "model folder; also the base model of every arm and of the base eval")
    backend: Backend = Field("transformers", description="model backend of every stage (a step may override it)")
    base_url: str | None = Field(None, description="server URL for backend http")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for every step")
    workers: int = Field(1, ge=1, description="processes that compute stage shards, training arms and evals side "
                         "by side, each with `threads` threads (default 1); steps start as soon as their inputs "
                         "are done. For CPU runs of a small model: workers x threads = the machine's cores")
    inputs: Inputs = Field(..., description="the prompts the first stages read")
    stages: list[StageStep] = Field(default_factory=list, description="stages, run in order")
    train: list[TrainArm] = Field(default_factory=list, description="training arms, run after the generate-phase "
                                  "stages")
    eval: EvalStep | None = Field(None, description="greedy accuracy of the base model and of every arm")
    report: bool = Field(True, description="write report/ (report.md, summary.json, plots)")
    export: ExportStep | None = Field(None, description="export the run's tables (and push them to the Hub)")

    def stage(self, stage_id: str) -> StageStep:
        for s in self.stages:
            if s.folder == stage_id:
                return s
        raise KeyError(stage_id)


def arm_ref(value: object) -> str | None:
    """The arm name of an `@ARM` reference (a stage's `model` or `value_model`), else None."""
    return value[1:] if isinstance(value, str) and value.startswith("@") else None


def policy_arms(cfg: RunConfig) -> list[TrainArm]:
    """The arms that train a policy (every arm but reward models): the ones the eval and the report compare."""
    return [a for a in cfg.train if not a.is_reward]


def arm_fields(cfg: RunConfig, arm: TrainArm, data: str, output_dir: str) -> dict[str, Any]:
    """The TrainConfig fields of a training arm: the run's model and threads, the arm's config, then the data
    and output folder the run assigns (the one place both the load-time check and the train step build them)."""
    return {"model": cfg.model, "threads": cfg.threads, **arm.config, "data": data, "output_dir": output_dir}


def _check_task(t: TaskInput, loc: tuple, file: str) -> None:
    """`overrides` are fields of the bundled task's settings model: an unknown one would be dropped silently."""
    from pipeline.tasks.registry import get_task

    arith = get_task("arith", preset=t.preset)
    model = type(arith.config)
    unknown = sorted(set(t.overrides) - set(model.model_fields))
    if unknown:
        raise InputError(f"unknown task option {unknown[0]!r}; known: {', '.join(model.model_fields)}",
                         file=file, column=dotted((*loc, "overrides", unknown[0])))
    validate(model, {**arith.config.model_dump(), **t.overrides}, file=file, prefix=(*loc, "overrides"),
             what="task options")


def _check_named_task(src: TaskSource, loc: tuple, file: str, needs_gold: str | None = None,
                      what: str = "gold answers to score against") -> None:
    """A named task exists, its options build it, a file task has its file, and a stage (or the eval) that needs
    gold does not get a gold-free task."""
    from pipeline.tasks.registry import get_task

    name = src.task_name
    try:
        task = get_task(name, **src.options)
    except InputError as e:
        raise InputError(e.reason, file=file, column=dotted((*loc, "options" if src.options else "task"))) from None
    if needs_gold is not None and not task.has_gold:
        who = "eval" if needs_gold == "eval" else f"stage {needs_gold!r}"
        raise InputError(f"{who} needs {what}; task {name!r} has no gold answers", file=file,
                         column=dotted((*loc, "task" if needs_gold == "eval" else "stage")))
    if task.generates and src.path is None and src.size is None and src.limit is None:
        raise InputError(f"task {name!r} generates its problems: give `size`", file=file,
                         column=dotted((*loc, "size")))
    if not task.generates and src.path is None:
        raise InputError(f"task {name!r} reads its problems from a file: give `path`", file=file,
                         column=dotted((*loc, "path")))
    if src.path is not None and not Path(src.path).exists():
        raise InputError(f"no such problems file {src.path!r} (relative paths start at the config's folder)",
                         file=file, column=dotted((*loc, "path")))


def _resolve_task_paths(cfg: "RunConfig", folder: Path) -> None:
    """Named tasks' `path` relative to the config's folder, resolved once at load (steps run from any cwd)."""
    for src in (cfg.inputs, cfg.eval):
        if src is not None and src.path is not None and not Path(src.path).is_absolute():
            src.path = str(folder / src.path)


def _output(outputs: dict[str, dict[str, str]], ref: str, loc: tuple, file: str) -> str:
    """The table kind behind `id` or `id@output`; an output the stage does not write is an error."""
    source, _, name = ref.partition("@")
    declared = outputs[source]  # the id itself was checked by RunConfig
    if (name or "main") not in declared:
        raise InputError(f"{source!r} has no output {name!r}; it writes {', '.join(sorted(declared))}", file=file,
                         column=dotted(loc))
    return declared[name or "main"]


def _check_refs(cfg: RunConfig, file: str) -> None:
    """Step references: inputs name earlier stages, ids and arm names are unique, phases and `@ARM` models fit."""
    def fail(message: str, *loc) -> None:
        raise InputError(message, file=file, column=dotted(loc))

    seen, post = {"inputs"}, {s.folder for s in cfg.stages if s.phase == "post_train"}
    for i, s in enumerate(cfg.stages):
        if s.input.split("@")[0] not in seen:
            fail(f"stage {s.folder!r}: input {s.input!r} is not `inputs` or an earlier stage id", "stages", i, "input")
        if s.folder in seen:
            fail(f"duplicate stage id {s.folder!r}", "stages", i, "id")
        seen.add(s.folder)
        if s.phase == "generate" and s.input.split("@")[0] in post:
            fail(f"stage {s.folder!r} runs before training but reads post_train stage {s.input!r}", "stages", i,
                 "input")
    arms = [a.name for a in cfg.train]
    by_name = {a.name: a for a in cfg.train}
    for i, s in enumerate(cfg.stages):
        if s.model and s.model.startswith("@") and (s.model[1:] not in arms or s.phase != "post_train"):
            fail(f"stage {s.folder!r}: model {s.model!r} needs a training arm of that name and phase: post_train",
                 "stages", i, "model")
        if arm_ref(s.model) and by_name[s.model[1:]].is_reward:
            fail(f"stage {s.folder!r}: model {s.model!r} is a reward arm (a classifier), not a policy; use it as "
                 f"`value_model`", "stages", i, "model")
        _check_value_model(s, i, by_name, [x.folder for x in cfg.stages[:i]], fail)
    for i, a in enumerate(cfg.train):
        if a.data.split("@")[0] in post:
            fail(f"train arm {a.name!r} reads post_train stage {a.data!r}", "train", i, "data")
        if a.data.split("@")[0] not in seen:
            fail(f"train arm {a.name!r}: data {a.data!r} is not a stage id", "train", i, "data")
        if a.name in arms[:i]:
            fail(f"train arm names must be unique: {a.name!r} is given twice", "train", i, "name")
    known = {"base", *(a.name for a in policy_arms(cfg)), *(cfg.eval.compare_with if cfg.eval else {})}
    for pool, members in (cfg.eval.pools if cfg.eval else {}).items():
        unknown = [m for m in members if m not in known]
        if unknown or not members:
            fail(f"eval pool {pool!r}: {unknown or 'no models'} not base, a policy arm or a compare_with label",
                 "eval", "pools", pool)


def _check_value_model(s: StageStep, i: int, arms: dict[str, TrainArm], earlier: list[str], fail) -> None:
    """`value_model: "@ARM"`: a reward arm of this run, trained on stages listed before this one, so the run can
    order it (that arm's data, the arm, then this stage) without waiting for every arm as post_train does. A folder
    path is checked by the stage's own config (stages/tree/config.py)."""
    name = arm_ref(s.config.get("value_model"))
    if name is None:
        return
    loc = ("stages", i, "config", "value_model")
    if name not in arms:
        fail(f"stage {s.folder!r}: value_model '@{name}' names no training arm; arms: "
             f"{', '.join(arms) or 'none'}", *loc)
    arm = arms[name]
    if not arm.is_reward:
        fail(f"stage {s.folder!r}: value_model '@{name}' is not a reward arm (its config needs mode: reward)", *loc)
    if s.phase == "generate" and arm.data.split("@")[0] not in earlier:
        fail(f"stage {s.folder!r}: value_model '@{name}' trains on {arm.data!r}, which is not a stage listed before "
             f"this one", *loc)


def check_steps(cfg: RunConfig, file: str) -> None:
    """Everything a run will do, checked before any step runs: each stage exists and its config validates, each
    input names an output that stage writes and of the kind the reader takes, each arm's config is a valid
    TrainConfig, the task options and the input file exist."""
    from pipeline.stage import get_stage, list_stages
    from pipeline.train.config import parse_config
    from stages.catalog import load_stage_modules

    load_stage_modules()
    _check_refs(cfg, file)
    if cfg.inputs.task is not None:
        _check_task(cfg.inputs.task, ("inputs", "task"), file)
    elif cfg.inputs.task_name is not None:
        _check_named_task(cfg.inputs, ("inputs",), file)
    if cfg.eval is not None and cfg.eval.task_name is not None:
        _check_named_task(cfg.eval, ("eval",), file, needs_gold="eval")
    if cfg.inputs.file is not None:
        q = Path(cfg.inputs.file)
        if not (q if q.is_absolute() else Path(file).resolve().parent / q).exists():
            raise InputError(f"no such prompts file {cfg.inputs.file!r} (relative paths start at the config's "
                             f"folder)", file=file, column="inputs.file")
    if cfg.eval is not None and cfg.eval.task_name is None:
        _check_task(cfg.eval.task, ("eval", "task"), file)
    outputs: dict[str, dict[str, str]] = {"inputs": {"main": "prompts"}}
    for i, step in enumerate(cfg.stages):
        if step.stage not in list_stages():
            raise InputError(f"unknown stage {step.stage!r}; registered: {', '.join(list_stages())}", file=file,
                             column=f"stages.{i}.stage")
        spec = get_stage(step.stage)
        stage_cfg = validate(spec.config, step.config, file=file, prefix=("stages", i, "config"),
                             what=f"config of stage '{step.stage}'")
        if spec.needs_backend:
            from pipeline.judges.config import check_stage_logprobs
            check_stage_logprobs(step.stage, stage_cfg, step.backend or cfg.backend, step.model or cfg.model,
                                 file=file, column=f"stages.{i}.backend")
        if step.input == "inputs" and cfg.inputs.task_name is not None and stage_cfg.gold_needed():
            _check_named_task(cfg.inputs, ("stages", i), file, needs_gold=step.stage,
                              what=stage_cfg.gold_needed())
        kind = _output(outputs, step.input, ("stages", i, "input"), file)
        if kind != spec.input_kind:
            raise InputError(f"stage {step.stage!r} reads {spec.input_kind}, but {step.input!r} holds {kind}",
                             file=file, column=f"stages.{i}.input")
        outputs[step.folder] = spec.outputs
    for i, arm in enumerate(cfg.train):
        _output(outputs, arm.data, ("train", i, "data"), file)
        for key in sorted({"data", "output_dir"} & set(arm.config)):
            raise InputError(f"{key} is set by the run (the arm's `data` stage and <output_dir>/train/{arm.name})",
                             file=file, column=f"train.{i}.config.{key}")
        parse_config(arm_fields(cfg, arm, data=arm.data, output_dir=arm.name), file=file,
                     prefix=("train", i, "config"))


def load_run_config(path: str | Path) -> tuple[RunConfig, Path]:
    """Read and check a run config; returns it and the folder relative paths resolve against. Every step is
    checked here, so a typo in the last one fails before the first one runs."""
    path = Path(path)
    cfg = validate(RunConfig, read_config(path, "run config"), file=str(path), what="run config")
    _resolve_task_paths(cfg, path.resolve().parent)
    check_steps(cfg, str(path))
    return cfg, path.resolve().parent
