"""An input error under Prefect reads like one outside it: exit 2 and the `error:` line, no traceback."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.prefect_server
@pytest.mark.timeout(300)
def test_input_error_under_prefect_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt_id": "a", "prompt": "ok"}\n{"prompt_id": "b", "prompt": "x\\ud800"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "hostile", "output_dir": str(tmp_path / "out"),
                                   "inputs": {"file": str(bad)},
                                   "stages": [{"id": "pairs", "stage": "toy-pairs", "shard_size": 8}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFPIPE_STAGE_MODULES": "tests.helpers.toy_stage"}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.Popen([sys.executable, "-m", "flows.app", "run", str(cfg)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=280)
    finally:  # the flow's temporary Prefect server is in its process group
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: file {bad}, row 2, column 'prompt': unpaired surrogate '\\ud800' at char 1 of a "
                      "string (not encodable as UTF-8)"], out
