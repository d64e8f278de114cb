"""bench/gpu_check.py on CPU (--device cpu --quick): every check is in the file, with values, and CUDA-only items
say they were skipped."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| check | status | result |" in proc.stdout  # the markdown table
    return json.loads(out.read_text())


def test_meta(results):
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["device_name"] == "CPU" and meta["quick"] is True
    assert meta["torch"] and meta["threads"] == 1 and meta["total_s"] > 0
    assert set(results["checks"]) == {"throughput", "mfu", "head_memory", "parity", "profile"}
    for name, check in results["checks"].items():
        assert check["seconds"] >= 0 and "error" not in check, (name, check.get("error"))


def test_throughput(results):
    run = results["checks"]["throughput"]["runs"]["tiny-policy"]
    assert results["checks"]["throughput"]["status"] == "ok"
    assert run["tokens_per_s"] > 0 and run["ref_pass_tokens_per_s"] > 0 and run["tokens_per_step"] > 0
    assert run["timed_steps"] == run["steps"] - 1  # warmup step left out
    assert run["ref_reused_in_train"] is True  # train() found the reference pass in the cache
    assert run["params"] == run["matmul_params"] > 0  # tiny-policy ties its embeddings to the head
    assert abs(run["first_loss"] - 0.6931472) < 1e-5  # step 1: policy == cached reference, loss = ln 2
    assert run["peak_gpu_mb"] is None


def test_mfu_is_null_on_cpu(results):
    mfu = results["checks"]["mfu"]
    assert mfu["status"] == "skipped" and mfu["peak_flops"] is None and "no CUDA" in mfu["skipped"]
    run = mfu["runs"]["tiny-policy"]
    n = results["checks"]["throughput"]["runs"]["tiny-policy"]["matmul_params"]
    assert run["mfu_6N"] is None and run["mfu_8N"] is None
    assert run["flops_per_token_6N"] == 6 * n and run["flops_per_token_8N"] == 8 * n


def test_head_memory(results):
    head = results["checks"]["head_memory"]
    assert head["status"] == "ok" and "no CUDA" in head["memory"]
    assert {(c["dtype"], c["tokens"]) for c in head["cases"]} == {(d, n) for d in ("fp32", "bf16")
                                                                   for n in (128, 512)}
    for c in head["cases"]:
        assert "chunked_peak_mb" in c and c["chunked_peak_mb"] is None  # CUDA-only figure
        assert "plain_peak_mb" in c and c["memory"] == "skipped: no CUDA"
        assert c["chunked_s"] > 0 and c["plain_s"] > 0
        assert c["logits_mb_if_materialised"] == c["tokens"] * c["vocab"] * 4 / 2 ** 20
        keys = ["chunked"]
        if importlib.util.find_spec("triton") is not None:  # Triton's interpreter on CPU (tests/conftest.py)
            assert c["triton_s"] > 0 and c["triton_peak_mb"] is None
            keys.append("triton")
        else:
            assert c["triton"].startswith("skipped")
        for key in keys:
            if c["dtype"] == "fp32":  # the fused head equals the plain one
                assert c[f"{key}_max_abs_diff_logp"] < 1e-4 and c[f"{key}_max_abs_diff_d_weight"] < 1e-4
                assert c[f"{key}_max_abs_diff_d_hidden"] < 1e-5


def test_parity_cpu_self_check(results):
    p = results["checks"]["parity"]
    assert p["status"] == "ok" and p["compared"] == "cpu_fp32_vs_cpu_fp32"
    assert p["max_abs_d_loss"] <= 1e-6
    assert p["cpu_fp32_vs_cpu_fp32"]["max_abs_d_rewards_margins"] <= 1e-6
    assert p["cpu_fp32_vs_cpu_fp32"]["max_abs_d_ref_logp"] <= 1e-6
    assert len(p["loss_cpu_fp32"]) == p["steps"] and len(set(p["loss_cpu_fp32"])) > 1  # the steps train
    assert p["cpu_fp32_vs_cuda_fp32"] == p["cpu_fp32_vs_cuda_bf16"] == "skipped: no CUDA"


def test_profile_is_cuda_only(results):
    assert results["checks"]["profile"]["status"] == "skipped"
    assert results["checks"]["profile"]["skipped"] == "skipped: no CUDA"
