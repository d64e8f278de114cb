"""Helpers shared by tests/test_backends*.py: the contract-test model and the backends under test."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def contract_model_dir(tmp_root: Path) -> Path:
    """data/tiny-policy once it is committed (a trained policy gives meaningful greedy text), else a random
    tiny Llama built here; PREFPIPE_CONTRACT_MODEL overrides both."""
    env = os.environ.get("PREFPIPE_CONTRACT_MODEL")
    if env:
        return Path(env)
    committed = ROOT / "data" / "tiny-policy"
    if (committed / "config.json").is_file() and (committed / "model.safetensors").is_file():
        return committed
    from pipeline.backends.fixtures import build_tiny_llama

    return build_tiny_llama(tmp_root / "tiny-llama", seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm_server(model_dir: Path, served: str, log_path: Path, timeout_s: float = 600):
    """`vllm serve` from the current interpreter's venv on 127.0.0.1; returns (process, base_url)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(2)
    proc.terminate()
    raise RuntimeError(f"vllm serve did not come up in {timeout_s:.0f} s; see {log_path}")
