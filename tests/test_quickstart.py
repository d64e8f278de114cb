"""The README's quickstart is run exactly as written (its bash block, in a fresh HOME), and what each command
leaves behind is checked: the task table, the stage's pairs, the inspect summary, the export, the trained model
and both evals. The numbers are those of the bundled tiny policy on the block's seven problems (seeded sampling,
greedy evals), so a change to any of these commands' behaviour shows here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["prefpipe task make", "prefpipe stage", "prefpipe inspect", "prefpipe export", "prefpipe train",
         "prefpipe eval"]


def quickstart_block(readme: str) -> str:
    """The first ```bash block of the README's quickstart section."""
    section = readme.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_quickstart_goes_from_file_to_stage_inspect_export_train_eval():
    """The block covers the whole path, in that order, and every command it runs is a prefpipe command."""
    block = quickstart_block((ROOT / "README.md").read_text())
    commands = [line.strip() for line in block.splitlines() if line.startswith("prefpipe ")]
    firsts = [next(i for i, c in enumerate(commands) if c.startswith(s)) for s in STEPS]
    assert firsts == sorted(firsts) and len(commands) == 7


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    block = quickstart_block((ROOT / "README.md").read_text())
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # the interpreter running the tests is the project's (its bin holds `prefpipe`)
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "120"}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    work = tmp_path / "prefpipe-quickstart"

    assert pq.read_table(work / "my-task" / "train.parquet").num_rows == 4
    shards = sorted((work / "runs" / "mine" / "sample-pairs").glob("part-*.parquet"))
    pairs = [r for f in shards for r in pq.read_table(f).to_pylist()]
    assert [r["status"] for r in pairs] == ["ok"] * 3
    assert all(r["chosen_correct"] and not r["rejected_correct"] for r in pairs)
    assert "ok=3" in p.stdout  # inspect's status count

    exported = list((work / "exports" / "mine" / "data" / "sample-pairs").glob("*.parquet"))
    assert sum(pq.read_table(f).num_rows for f in exported) == 3
    assert (work / "exports" / "mine" / "README.md").exists()

    summary = json.loads((work / "runs" / "mine" / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 2
    assert (work / "runs" / "mine" / "train" / "final" / "model.safetensors").exists()

    for name in ("base.json", "trained.json"):
        ev = json.loads((work / name).read_text())
        assert (ev["n"], ev["correct"]) == (3, 2), name
