"""Configs are checked whole at load, before anything runs: run configs (every step and arm), training configs and
stage configs. Each hostile config exits 2 with one `error:` line naming the file and the dotted key, and writes
nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import load_run_config
from pipeline.config_options import model_options
from pipeline.train.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PREFPIPE = Path(sys.executable).parent / "prefpipe"

# A valid two-stage, two-arm run; each case below breaks one thing in it.
BASE = {
    "name": "cfgtest",
    "inputs": {"task": {"preset": "tiny", "split": "train", "n": 4}},
    "stages": [{"id": "tree", "stage": "tree-search", "config": {"expansion_width": 2}},
               {"id": "sel", "stage": "select-pairs", "input": "tree"}],
    "train": [{"name": "first", "data": "sel", "config": {"lr": 1e-5, "max_steps": 2}},
              {"name": "last", "data": "tree", "config": {"lr": 1e-5, "loss": {"rpo_alpha": 1.0}}}],
}


def _config(tmp_path: Path, edit=None, text: str | None = None, name: str = "run.yaml") -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    cfg["output_dir"] = str(tmp_path / "out")
    if edit is not None:
        edit(cfg)
    p = tmp_path / name
    p.write_text(text if text is not None else yaml.safe_dump(cfg, sort_keys=False))
    return p


def _files(tmp_path: Path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


def _cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from flows.app import main

    monkeypatch.setattr(sys, "argv", ["prefpipe", *map(str, argv)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, file: Path, key: str, text: str = "") -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[0].startswith("error: ") and len(lines) == 1, err  # one line, no traceback before it
    assert f"file {file}" in lines[0] and (key is None or f"column '{key}'" in lines[0]), err
    assert text in lines[0], err


def test_the_base_config_is_valid(tmp_path):
    cfg, _ = load_run_config(_config(tmp_path))
    assert [s.folder for s in cfg.stages] == ["tree", "sel"] and [a.name for a in cfg.train] == ["first", "last"]
    assert not (tmp_path / "out").exists()


# The four failures the issue names, through the real `prefpipe run CONFIG` (Prefect on, as users run it): exit 2
# with the file and key, no traceback, no output folder. The timeout turns a run that starts working into a failure.
ISSUE_CASES = {
    "typo-in-last-arm": (lambda c: c["train"][1]["config"].update(max_stpes=3), "train.1.config.max_stpes",
                         "Extra inputs are not permitted"),
    "unknown-stage": (lambda c: c["stages"][0].update(stage="tree-serch"), "stages.0.stage", "unknown stage"),
    "unknown-output": (lambda c: c["stages"][1].update(input="tree@nope"), "stages.1.input",
                       "'tree' has no output 'nope'; it writes lists, main, trees"),
    "unknown-task-option": (lambda c: c["inputs"]["task"].update(overrides={"bogus": 1}),
                            "inputs.task.overrides.bogus", "unknown task option 'bogus'"),
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_prefpipe_run_refuses_before_anything_runs(case, tmp_path):
    edit, key, text = ISSUE_CASES[case]
    path = _config(tmp_path, edit)
    before = _files(tmp_path)
    env = {**os.environ, "PREFPIPE_NO_PROGRESS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([str(PREFPIPE), "run", str(path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    _assert_refused(proc.returncode, proc.stderr, path, key, text)
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stdout == ""
    assert _files(tmp_path) == before and not (tmp_path / "out").exists()


def _set(path: tuple, value):
    def edit(c):
        node = c
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


# (edit of the base config, key named in the error, text in the error)
RUN_CASES = {
    "lr-inf": (_set(("train", 0, "config", "lr"), float("inf")), "train.0.config.lr", "finite"),
    "beta-inf": (_set(("train", 1, "config", "loss"), {"beta": float("inf")}), "train.1.config.loss.beta",
                 "finite"),
    "beta-nan": (_set(("train", 0, "config", "list_loss"), {"beta": float("nan")}),
                 "train.0.config.list_loss.beta", "finite"),
    "lr-negative": (_set(("train", 0, "config", "lr"), -1e-5), "train.0.config.lr", "greater than 0"),
    "fail-threshold-negative": (_set(("stages", 0, "fail_threshold"), -1), "stages.0.fail_threshold",
                                "greater than or equal to 0"),
    "fail-threshold-inf": (_set(("stages", 0, "fail_threshold"), float("inf")), "stages.0.fail_threshold",
                           "finite"),
    "empty-stop-string": (_set(("stages", 0, "config", "step_stop"), [""]), "stages.0.config.step_stop.0",
                          "at least 1 character"),
    "stage-temperature-inf": (_set(("stages", 0, "config", "temperature"), float("inf")),
                              "stages.0.config.temperature", "finite"),
    "stage-config-unknown-field": (_set(("stages", 0, "config", "widht"), 3), "stages.0.config.widht",
                                   "Extra inputs"),
    "stage-config-wrong-type": (_set(("stages", 0, "config", "expansion_width"), "many"),
                                "stages.0.config.expansion_width", "valid integer"),
    "arm-name-escapes": (_set(("train", 0, "name"), "../evil"), "train.0.name", "not a safe name"),
    "arm-name-absolute": (_set(("train", 0, "name"), "/tmp/evil"), "train.0.name", "not a safe name"),
    "stage-id-slash": (_set(("stages", 0, "id"), "a/b"), "stages.0.id", "not a safe name"),
    "stage-id-hidden": (_set(("stages", 0, "id"), ".tree"), "stages.0.id", "not a safe name"),
    "run-name-nul": (_set(("name",), "run\0x"), "name", "not a safe name"),
    "export-out-escapes": (_set(("export",), {"out": "../../x"}), "export.out", "not a safe name"),
    "kind-mismatch": (_set(("stages", 1, "input"), "tree@trees"), "stages.1.input",
                      "'select-pairs' reads pairs, but 'tree@trees' holds trees"),
    "arm-unknown-output": (_set(("train", 1, "data"), "tree@nope"), "train.1.data", "no output 'nope'"),
    "arm-unknown-stage": (_set(("train", 1, "data"), "nope"), "train.1.data", "is not a stage id"),
    "arm-sets-data": (_set(("train", 0, "config", "data"), "/elsewhere"), "train.0.config.data",
                      "set by the run"),
    "arm-duplicate-name": (_set(("train", 1, "name"), "first"), "train.1.name", "unique"),
    "arm-ld-alpha": (_set(("train", 1, "config", "loss"), {"ld_alpha": 0.5}), "train.1.config.loss",
                     "ld_alpha=0.5 is not supported by the trainer"),
    "arm-wpo": (_set(("train", 1, "config", "loss"), {"use_weighting": True}), "train.1.config.loss",
                "use_weighting=True is not supported"),
    "arm-adam-beta": (_set(("train", 0, "config", "adam_betas"), [0.9, 1.0]), "train.0.config.adam_betas.1",
                      "less than 1"),
    "input-unknown-stage": (_set(("stages", 1, "input"), "nope"), "stages.1.input", "not `inputs` or an earlier"),
    "duplicate-stage-id": (_set(("stages", 1, "id"), "tree"), "stages.1.id", "duplicate stage id"),
    "eval-task-option-range": (_set(("eval",), {"task": {"split": "eval", "n": 5, "overrides": {"min_steps": 0}}}),
                               "eval.task.overrides.min_steps", "greater than or equal to 1"),
    "task-n-zero": (_set(("inputs", "task", "n"), 0), "inputs.task.n", "greater than or equal to 1"),
    "step-backend-typo": (_set(("stages", 0, "backend"), "vlm"), "stages.0.backend", "'transformers'"),
    "missing-prompts-file": (_set(("inputs",), {"file": "nope.jsonl"}), "inputs.file", "no such prompts file"),
    "at-arm-without-phase": (_set(("stages", 1, "model"), "@first"), "stages.1.model", "phase: post_train"),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_hostile_run_config(case, tmp_path, monkeypatch, capsys):
    edit, key, text = RUN_CASES[case]
    refused_in_process(_config(tmp_path, edit), key, text, monkeypatch, capsys)


def refused_in_process(path: Path, key: str, text: str, monkeypatch, capsys) -> None:
    """`prefpipe run PATH` in this process exits 2 naming the file and key, and writes nothing beside PATH."""
    before = _files(path.parent)
    code, err = _cli(["run", path], monkeypatch, capsys)
    _assert_refused(code, err, path, key, text)
    assert _files(path.parent) == before


# Whole-file problems: the reader refuses them before any field is looked at.
FILE_CASES = {
    "duplicate-key": ("name: a\ninputs: {task: {}}\nname: b\n", "name", "given twice (lines 1 and 3)"),
    "duplicate-nested-key": ("inputs: {task: {n: 3, n: 4}}\n", "n", "given twice"),
    "json-duplicate-key": ('{"inputs": {"task": {}}, "inputs": {"file": "x"}}', "inputs", "given twice"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_config_file(case, tmp_path, monkeypatch, capsys):
    text, key, message = FILE_CASES[case]
    path = _config(tmp_path, text=text, name="run.json" if case.startswith("json") else "run.yaml")
    refused_in_process(path, key, message, monkeypatch, capsys)


@pytest.mark.parametrize("content,message", [
    (b"name: caf\xe9\ninputs: {task: {}}\n", "not UTF-8 text (byte 9)"),
    (b"- inputs\n- stages\n", "must be a mapping of field: value, not a list"),
    (b"inputs: {task: {n: [1, 2}\n", "not valid YAML"),
    (b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", "not valid YAML: nested too deeply"),
    (b"", "column 'inputs': Field required"),
])
def test_unreadable_run_config(content, message, tmp_path, monkeypatch, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    code, err = _cli(["run", path], monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: file {path}") and message in err and len(err.splitlines()) == 1
    assert _files(tmp_path) == {"run.yaml"}


def test_config_folder_and_missing_file(tmp_path, monkeypatch, capsys):
    code, err = _cli(["run", tmp_path], monkeypatch, capsys)
    assert code == 2 and "the config file is a folder" in err and str(tmp_path) in err
    code, err = _cli(["run", tmp_path / "nope.yaml"], monkeypatch, capsys)
    assert code == 2 and "no such config file" in err


def test_shipped_run_configs_load():
    """The checks refuse no config the project ships (they name real stages, outputs and trainer fields).
    experiments/ is not part of the product: no test reads it."""
    paths = sorted([*ROOT.glob("flows/configs/*.yaml"), *ROOT.glob("bench/*.yaml")])
    assert len(paths) >= 3
    for p in paths:
        cfg, _ = load_run_config(p)
        assert cfg.inputs.task is not None or cfg.inputs.file is not None or cfg.inputs.task_name is not None


# ---------------------------------------------------------------------------------------------- prefpipe train

TRAIN_CASES = {
    "lr-inf": ("model: m\ndata: d\nlr: .inf\n", [], "lr", "finite"),
    "loss-beta-inf": ("model: m\ndata: d\nloss: {beta: .inf}\n", [], "loss.beta", "finite"),
    "loss-weights-nan": ("model: m\ndata: d\nloss: {loss_type: [sigmoid, sft], loss_weights: [1, .nan]}\n", [],
                         "loss.loss_weights.1", "finite"),
    "duplicate-key": ("model: m\ndata: d\nlr: 1e-5\nlr: 1e-3\n", [], "lr", "given twice"),
    "ld-alpha-option": ("model: m\ndata: d\n", ["--loss.ld-alpha", "0.5"], "loss", "ld_alpha=0.5 is not supported"),
    "wpo-option": ("model: m\ndata: d\n", ["--loss.use-weighting"], "loss", "use_weighting=True"),
    "lr-option-inf": ("model: m\ndata: d\n", ["--lr", "inf"], "lr", "finite"),
    "beta-option-nan": ("model: m\ndata: d\n", ["--beta", "nan"], "loss.beta", "finite"),
    "adam-betas-option": ("model: m\ndata: d\n", ["--adam-betas", "0.9,1.5"], "adam_betas.1", "less than 1"),
    "max-grad-norm-zero": ("model: m\ndata: d\nmax_grad_norm: 0\n", [], "max_grad_norm", "greater than 0"),
    "tpo-range-empty": ("model: m\ndata: d\nlist_loss: {loss_type: tpo, tpo_label_range: [1, 1]}\n", [],
                        "list_loss", "must run from low to high"),
    "seed-negative": ("model: m\ndata: d\n", ["--seed", "-1"], "seed", "greater than or equal to 0"),
    "ld-on-reference": ("model: m\ndata: d\nloss: {ld_on_reference: false}\n", [], "loss",
                        "ld_on_reference=False is not supported"),
    "pair-filter-lists": ("model: m\ndata: d\ndata_kind: lists\npair_filter: hard\n", [], None,
                          "pair_filter applies to preference pairs"),
    "tokenize-unknown": ("model: m\ndata: d\ntokenize: {max_lenght: 8}\n", [], "tokenize.max_lenght", "Extra"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_hostile_train_config(case, tmp_path, monkeypatch, capsys):
    text, options, key, message = TRAIN_CASES[case]
    path = tmp_path / "train.yaml"
    path.write_text(text)
    code, err = _cli(["train", path, "-o", tmp_path / "out", *options], monkeypatch, capsys)
    _assert_refused(code, err, path, key, message)
    assert _files(tmp_path) == {"train.yaml"}


def test_train_options_are_generated_from_the_config():
    """Every TrainConfig field, nested ones included, has an option with help text; none is hand-listed."""
    def leaves(model, prefix=""):
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, TrainConfig.__base__) and sub is not TrainConfig:
                yield from leaves(sub, f"{prefix}{name}__")
            else:
                yield prefix + name
    params = model_options(TrainConfig, panel="Training", nested=True, lists=True)
    assert sorted(p.name for p in params) == sorted(leaves(TrainConfig))
    assert all(p.default.help and p.default.help.strip() != "[default:" for p in params)
    flags = {d for p in params for d in p.default.param_decls}
    assert {"--loss.beta", "--list-loss.beta", "--tokenize.max-length", "--max-steps"} <= flags


def test_train_shortcuts_and_nested_options_reach_the_config(tmp_path):
    """`--beta` sets the β of both losses (list losses used to keep 0.1); a full name wins over a shortcut;
    list options take a comma list."""
    from pipeline.train.cli import overrides

    opts = {"short__beta": 0.3, "short__loss_type": "sigmoid,sft", "short__max_length": 64, "loss__beta": None,
            "list_loss__loss_type": "tpo", "adam_betas": "0.8,0.9", "lr": 2e-5}
    cfg = load_config(None, {"model": "m", "data": "d", **overrides(dict(opts))})
    assert (cfg.loss.beta, cfg.list_loss.beta, cfg.list_loss.loss_type) == (0.3, 0.3, "tpo")
    assert cfg.loss.loss_type == ["sigmoid", "sft"] and cfg.tokenize.max_length == 64
    assert cfg.adam_betas == (0.8, 0.9) and cfg.lr == 2e-5
    cfg = load_config(None, {"model": "m", "data": "d", **overrides({"short__beta": 0.3, "loss__beta": 0.5})})
    assert (cfg.loss.beta, cfg.list_loss.beta) == (0.5, 0.3)


# ---------------------------------------------------------------------------------------------- prefpipe stage

STAGE_CASES = {
    "empty-stop": ("generate", "stop: ['']\n", [], "stop.0", "at least 1 character"),
    "temperature-inf": ("generate", "temperature: .inf\n", [], "temperature", "finite"),
    "duplicate-key": ("generate", "n: 2\nn: 3\n", [], "n", "given twice"),
    "not-a-mapping": ("generate", "[1, 2]\n", [], None, "must be a mapping"),
    "fail-threshold-negative": ("generate", "n: 2\n", ["--fail-threshold", "-1"], "--fail-threshold",
                                "must be in [0.0, 1.0], got -1.0"),
    "fail-threshold-nan": ("generate", "n: 2\n", ["--fail-threshold", "nan"], "--fail-threshold", "got nan"),
    "shard-size-zero": ("generate", "n: 2\n", ["--shard-size", "0"], "--shard-size", "must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(STAGE_CASES))
def test_hostile_stage_config(case, tmp_path, monkeypatch, capsys):
    stage, text, options, key, message = STAGE_CASES[case]
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "a", "prompt": "1+1="}\n')
    code, err = _cli(["stage", stage, "-c", path, "-i", prompts, "-o", tmp_path / "run", *options],
                     monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err and (key is None or f"column '{key}'" in err), err
    where = "file <command line>" if key and key.startswith("--") else f"file {path}"
    assert where in err, err
    assert _files(tmp_path) == {"stage.yaml", "prompts.jsonl"}


def test_every_run_config_key_is_documented():
    """docs/configs.md lists every key of a run config, and every key has a description in the model."""
    from flows import config as run_config

    doc = (ROOT / "docs" / "configs.md").read_text()
    models = (run_config.RunConfig, run_config.Inputs, run_config.TaskInput, run_config.StageStep,
              run_config.TrainArm, run_config.EvalStep, run_config.ExportStep)
    internal = {"task_name"}  # filled from `task: NAME` by the loader, never written in a config
    missing = [f"{m.__name__}.{name}" for m in models for name in m.model_fields
               if f"`{name}`" not in doc and name not in internal]
    undescribed = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert missing == [] and undescribed == []
