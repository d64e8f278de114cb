"""What the trainer does to keep a GPU busy, checked on CPU: host-side batch copies, metrics summed on the device
and read back once per step, the SDPA kernel choice, and that none of it changes the numbers."""
from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from pipeline.train.collate import collate
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import MetricSums, Trainer, sdpa_context


def _pairs(path, n=8):
    rows = {"prompt": [f"{a}+{a + 2}=" for a in range(n)],
            "chosen": [str(2 * a + 2) for a in range(n)], "rejected": [str(2 * a + 1) for a in range(n)]}
    pq.write_table(pa.table(rows), path)
    return path


def _cfg(tmp_path, name, **kw):
    return TrainConfig(model="data/tiny-policy", data=str(_pairs(tmp_path / "pairs.parquet")),
                       output_dir=str(tmp_path / name), device="cpu", micro_batch=2, grad_accum=2, max_steps=2,
                       lr=1e-4, seed=0, save_final=False, progress=False, ref_cache_dir=str(tmp_path / f"r-{name}"),
                       drift_probe=0, **kw)


def test_batch_keeps_host_copies(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "a"))
    batch = collate(trainer.data, [3, 0, 5], trainer.pad_id, False)
    assert batch.index_host.tolist() == [3, 0, 5] == batch.index.tolist()
    assert batch.tokens_host == int(batch.attention_mask.sum())
    moved = batch.to("cpu")
    assert moved.index_host is batch.index_host and moved.num_tokens() == batch.tokens_host
    assert np.array_equal(moved.host_index(), [3, 0, 5])


def test_metric_sums_match_float_sums():
    sums = MetricSums()
    parts = [(torch.tensor(0.25), {"a": torch.tensor(2.0), "b": 1.5}, 0.5, 10),
             (torch.tensor(0.5), {"a": torch.tensor(4.0), "b": 0.5}, 0.5, 7)]
    for loss, metrics, share, tokens in parts:
        sums.add(loss, metrics, share, tokens)
    out = sums.result()
    assert out == {"loss": 0.75, "a": 3.0, "b": 1.0, "num_tokens": 17}
    assert all(type(v) in (float, int) for v in out.values())


def test_sdpa_context_choice():
    assert isinstance(sdpa_context("auto", torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(sdpa_context(None, torch.device("cpu")), contextlib.nullcontext)
    assert not isinstance(sdpa_context(["math"], torch.device("cpu")), contextlib.nullcontext)
    with pytest.raises(ValidationError):
        TrainConfig(model="m", data="d", sdpa_backends="flash")
    with pytest.raises(ValidationError):
        TrainConfig(model="m", data="d", sdpa_backends=["cudnnn"])


def test_sdpa_math_only_trains_the_same(tmp_path):
    """The math kernel alone gives the losses and weights of torch's default choice (flash on CPU)."""
    runs = {}
    for name, backends in (("default", "auto"), ("math", ["math"])):
        trainer = Trainer(_cfg(tmp_path, name, sdpa_backends=backends))
        result = trainer.train()
        runs[name] = ([h["loss"] for h in result.history], [h["num_tokens"] for h in result.history],
                      [h["grad_norm"] for h in result.history])
    (l_a, n_a, g_a), (l_b, n_b, g_b) = runs["default"], runs["math"]
    assert len(l_a) == 2 and n_a == n_b and all(n > 0 for n in n_a)
    assert abs(l_a[0] - 0.6931472) < 1e-5
    assert max(abs(a - b) for a, b in zip(l_a, l_b)) < 1e-5
    # gradients (not weights: Adam turns rounding-level gradient differences into lr-sized steps where the
    # gradient is near zero) agree to 1e-5 relative
    assert max(abs(a - b) / a for a, b in zip(g_a, g_b)) < 1e-5


def test_reference_prepared_once_per_trainer(tmp_path, monkeypatch):
    """train() after an explicit prepare_reference() keeps that reference: no second weight hash or cache read."""
    trainer = Trainer(_cfg(tmp_path, "once"))
    trainer.prepare_reference()
    ref, first = trainer.ref, dict(trainer.ref_info)
    assert first["reused"] is False and first["forwards"] > 0

    def no_second_hash():
        raise AssertionError("the weights were hashed again")
    monkeypatch.setattr(trainer, "_ref_weights_id", no_second_hash)
    result = trainer.train()
    assert trainer.ref is ref and result.ref_reused is True and result.ref_forwards == 0
    assert trainer.ref_info["path"] == first["path"]
    assert abs(result.history[0]["loss"] - 0.6931472) < 1e-5
