"""Run a stage-writing child script that may SIGKILL itself after a given shard (resume tests)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child_runner(script: Path):
    """A function (run_dir, kill_after) -> CompletedProcess running `script` with the repo on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def child(run_dir, kill_after):
        return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_after)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
    return child
