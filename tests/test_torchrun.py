"""The trainer under torchrun on CPU (gloo): 2 ranks follow the 1-process loss trajectory with the same global
batch (DDP to 1e-5; FSDP2 to a measured tolerance), and checkpoints resume the same trajectory.

This file is also the torchrun worker: `torchrun --nproc_per_node 2 tests/test_torchrun.py MODE OUT_DIR DATA`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PREFPIPE_NO_PROGRESS"] = "1"

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, MICRO, ACCUM = 4, 2, 4          # global batch 8 = 4 micro-batches of 2: 2 per rank on 2 ranks
DDP_TOL = 1e-5
FSDP_TOL = 1e-5   # measured here: max per-step |diff| 2.2e-7 (FSDP2), 2.3e-7 (DDP) over 4 steps


def _pairs(n: int = 16) -> pa.Table:
    sums = [(3 + 7 * i, 11 + i) for i in range(n)]
    return pa.table({
        "prompt": [f"Add {a} and {b}." + " Show work." * (i % 3) for i, (a, b) in enumerate(sums)],
        "chosen": [f"{a}+{b}={a + b}. Answer: {a + b}" for a, b in sums],
        "rejected": [f"{a}+{b}={a + b + 1}. Answer: {a + b + 1 + i % 2}" for i, (a, b) in enumerate(sums)]})


def _config(data: Path, out: Path, mode: str, **kw):
    from pipeline.train.config import TrainConfig
    base = dict(model="in-memory", data=str(data), output_dir=str(out), lr=1e-3, device="cpu", threads=1,
                micro_batch=MICRO, grad_accum=ACCUM, max_steps=STEPS, save_every=2, save_final=False,
                progress=False, ref_cache_dir=str(out.parent / "refcache"), distributed=mode, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _model():
    from pipeline.train.tiny import char_tokenizer, tiny_llama
    tok = char_tokenizer()
    return tiny_llama(len(tok), seed=0), tok


def _train(cfg) -> list[float]:
    from pipeline.train.launch import make_trainer
    model, tok = _model()
    res = make_trainer(cfg, model=model, tokenizer=tok).train()
    return [m["loss"] for m in res.history]


def worker(mode: str, out: str, data: str) -> None:
    """One torchrun rank: a full run, then a resume from checkpoint-2 (fresh model), losses written by rank 0."""
    import torch.distributed as dist
    from pipeline.distributed.ddp import close
    torch.set_num_threads(1)
    out_dir = Path(out)
    full = _train(_config(Path(data), out_dir / "run", mode))
    resumed = _train(_config(Path(data), out_dir / "run", mode, resume_from=str(out_dir / "run" / "checkpoint-2")))
    if dist.get_rank() == 0:
        (out_dir / "losses.json").write_text(json.dumps({"full": full, "resumed": resumed,
                                                         "world": dist.get_world_size()}))
    close()


# ---------------------------------------------------------------------------------------------------- tests
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ref")
    data = root / "pairs.parquet"
    pq.write_table(_pairs(), data)
    return data, _train(_config(data, root / "run", "none"))


def _torchrun(mode: str, data: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(Path(__file__).resolve()), mode, str(out), str(data)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("mode,tol", [("ddp", DDP_TOL), pytest.param("fsdp", FSDP_TOL, marks=pytest.mark.slow)])
def test_two_ranks_follow_the_single_process_trajectory(reference, tmp_path, mode, tol):
    data, single = reference
    got = _torchrun(mode, data, tmp_path)
    assert got["world"] == 2 and len(got["full"]) == len(single) == STEPS
    diffs = [abs(a - b) for a, b in zip(got["full"], single)]
    assert max(diffs) <= tol, f"{mode}: per-step |loss diff| {diffs}"
    assert abs(single[0] - 0.6931471805599453) < 1e-6  # step 1: policy == reference, sigmoid DPO = ln 2
    # resuming from checkpoint-2 replays steps 3-4 of the same trajectory
    assert len(got["resumed"]) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(got["resumed"], got["full"][2:])) <= 1e-6


def test_single_process_resume_continues_the_same_trajectory(reference, tmp_path):
    data, single = reference
    full = _train(_config(data, tmp_path / "run", "none"))
    assert full == single  # deterministic
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "optimizer.safetensors").exists() and (ckpt / "model.safetensors").exists()
    resumed = _train(_config(data, tmp_path / "run", "none", resume_from="latest", max_steps=STEPS))
    # 'latest' is checkpoint-2 (a checkpoint is not written at the last step); same float ops -> same numbers
    assert resumed == full[2:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 3, 4]  # the resumed run appends


def test_resume_refuses_another_config(reference, tmp_path):
    from pipeline.errors import InputError
    data, _ = reference
    _train(_config(data, tmp_path / "run", "none", max_steps=2, save_every=1))
    with pytest.raises(InputError, match=r"fields \['lr'\] differ"):
        _train(_config(data, tmp_path / "run", "none", max_steps=2, lr=5e-4, resume_from="latest"))


if __name__ == "__main__":
    worker(*sys.argv[1:4])


def test_coupled_losses_are_named_when_ranks_split_the_batch(tmp_path):
    from pipeline.distributed.ddp import coupling_note

    coupled = _config(tmp_path / "d.parquet", tmp_path / "o", "ddp", loss={"loss_type": ["aot", "sigmoid"]})
    assert coupling_note(coupled, 2).startswith("aot couple(s) the pairs of a batch: with 2 ranks")
    assert coupling_note(coupled, 1) is None
    assert coupling_note(_config(tmp_path / "d.parquet", tmp_path / "o", "ddp"), 2) is None
