"""The `prefpipe` command assembled in flows/app.py: global --version and --threads, every area's commands."""
from __future__ import annotations

import os
from importlib.metadata import version

import pytest
import torch

from flows import app as cli
from pipeline import threads
from tests.helpers.cli import run_prefpipe


def _run(monkeypatch, capsys, *argv) -> tuple[int, str]:
    code, out, err = run_prefpipe(argv, monkeypatch, capsys)
    return code, out + err


@pytest.fixture
def restore_threads(monkeypatch):
    for var in threads.ENV_VARS:  # monkeypatch puts every variable back afterwards
        monkeypatch.setenv(var, "1")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_version_prints_the_installed_version(monkeypatch, capsys):
    code, out = _run(monkeypatch, capsys, "--version")
    assert (code, out.strip()) == (0, f"prefpipe {version('prefpipe')}")


def test_threads_option_sets_torch_and_the_environment_of_workers(monkeypatch, capsys, restore_threads):
    code, _ = _run(monkeypatch, capsys, "--threads", "3", "task", "--help")
    assert code == 0
    assert torch.get_num_threads() == 3
    assert {os.environ[v] for v in threads.ENV_VARS} == {"3"}


def test_threads_zero_is_a_usage_error(monkeypatch, capsys, restore_threads):
    code, out = _run(monkeypatch, capsys, "--threads", "0", "task", "--help")
    assert code == 2 and "--threads" in out


def test_default_threads_follow_the_environment_then_the_constant(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.resolve_threads(None) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.resolve_threads(None) == threads.DEFAULT_THREADS == 1
    assert threads.resolve_threads(5) == 5


def test_every_area_registers_its_commands():
    top = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    groups = {g.name for g in cli.app.registered_groups}
    stages = {c.name for c in cli.stage_app.registered_commands}
    assert {"inspect", "validate", "train", "eval", "generate", "export", "run", "serve"} <= top
    assert {"stage", "task"} <= groups
    assert {"generate", "tree-search", "sample-pairs", "self-label", "reward-relabel"} <= stages


def _leaf_commands(command, path):
    subs = getattr(command, "commands", None)
    if not subs:
        yield path, command
        return
    for name, sub in subs.items():
        yield from _leaf_commands(sub, path + [name])


def test_every_command_shows_an_example_that_uses_its_own_options():
    import shlex

    import typer

    leaves = list(_leaf_commands(typer.main.get_command(cli.app), ["prefpipe"]))
    assert len(leaves) >= 20  # every area's commands and one per stage
    for path, command in leaves:
        example = command.epilog or ""
        assert example.startswith(f"Example: {' '.join(path)} "), (path, example)
        opts = {o for p in command.params for o in p.opts + p.secondary_opts}
        used = {t for t in shlex.split(example.removeprefix("Example: ")) if t.startswith("-")}
        assert used <= opts, (path, used - opts)
