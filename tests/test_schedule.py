"""A real local Prefect server, the flow served on a short interval, and a scheduled run that completes."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_served_flow_runs_on_schedule(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(ROOT), "PREFPIPE_STAGE_MODULES": "tests.helpers.toy_stage",
           "PREFPIPE_NO_PROGRESS": "1"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    served = None
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180, "the Prefect server")
        cfg = {"name": "scheduled", "output_dir": str(tmp_path / "run"),
               "inputs": {"task": {"preset": "tiny", "split": "train", "n": 12}},
               "stages": [{"id": "pairs", "stage": "toy-pairs", "shard_size": 4}], "report": True}
        cfg_path = tmp_path / "scheduled.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        served = subprocess.Popen([sys.executable, "-m", "flows.app", "serve", str(cfg_path), "--interval", "10"],
                                  env={**env, "PREFECT_API_URL": api}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)

        def completed():
            r = httpx.post(f"{api}/flow_runs/filter", timeout=5,
                           json={"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
            return any(run.get("deployment_id") for run in r.json())
        _wait(completed, 300, "a scheduled flow run to complete")
        from pipeline.store import RunStore
        assert RunStore(tmp_path / "run").stage("pairs").num_rows() == 12
        assert (tmp_path / "run/report/report.md").exists()
    finally:
        for p in (served, server):
            if p is not None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
