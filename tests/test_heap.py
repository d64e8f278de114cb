"""Heap trimming (pipeline/train/heap.py): where the trims fire, and that they change no number."""
from __future__ import annotations

import copy
import os
import sys

import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PREFPIPE_NO_PROGRESS"] = "1"

from pipeline.train import heap  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.tiny import char_tokenizer, tiny_llama  # noqa: E402
from pipeline.train.trainer import Trainer  # noqa: E402
from tests.test_trainer import _pair_table  # noqa: E402

torch.set_num_threads(1)
glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None,
                           reason="malloc_trim is glibc's")


def _model(layers=4):
    tok = char_tokenizer()
    return tok, tiny_llama(len(tok), hidden=32, layers=layers, heads=2, seed=0)


def test_decoder_layers_is_the_block_stack():
    _, model = _model(layers=5)
    assert heap.decoder_layers(model) is model.model.layers
    assert heap.decoder_layers(torch.nn.Linear(2, 2)) is None


@glibc
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trims_fire_at_the_layer_boundaries(checkpointing, monkeypatch):
    monkeypatch.setattr(heap, "MIN_FREE_BYTES", 0)  # a tiny model's heap has little free: trim at every point
    monkeypatch.setattr(heap, "MIN_PARAMS", 0)
    # 4 layers, every 2: end of forward (layer 3's output), backward into layer 2's and layer 0's outputs,
    # backward into the embedding's output = 4. The checkpointed recompute adds none: it stops once the saved
    # tensors are back, so layer 3's forward hook does not run again, and recomputed outputs get no gradient.
    expected = 4
    tok, model = _model(layers=4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trimmer = heap.HeapTrimmer(model, every=2)
    ids = torch.tensor([tok.encode("What is 2+3? 5")])
    model(input_ids=ids).logits.sum().backward()
    assert trimmer.calls == expected
    trimmer.remove()
    model(input_ids=ids).logits.sum().backward()
    assert trimmer.calls == expected
    assert heap.HeapTrimmer(model, every=0).active is False


@glibc
def test_trimming_changes_no_number(tmp_path, monkeypatch):
    monkeypatch.setattr(heap, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(heap, "MIN_PARAMS", 0)
    tok, model = _model(layers=4)
    path = tmp_path / "pairs.parquet"
    pq.write_table(_pair_table(), path)
    runs = []
    for every in (0, 1):
        cfg = TrainConfig(model="in-memory", data=str(path), output_dir=str(tmp_path / f"out{every}"), lr=1e-3,
                          device="cpu", save_final=False, progress=False, micro_batch=4, max_steps=3,
                          gradient_checkpointing=True, heap_trim_every=every,
                          ref_cache_dir=str(tmp_path / "cache"))
        t = Trainer(cfg, model=copy.deepcopy(model), tokenizer=tok)
        res = t.train()
        runs.append(([h["loss"] for h in res.history], {k: v.clone() for k, v in t.model.state_dict().items()},
                     t.heap.calls))
    assert runs[0][0] == runs[1][0]  # bit-identical losses
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[0][2] == 0
    # per step (one micro-batch of 4): its start, end of forward, 4 layers' backward, the embedding's backward;
    # one after the reference pass; the end of the drift probe's forward before and after training
    assert runs[1][2] == 3 * (1 + 1 + 4 + 1) + 1 + 2


@glibc
def test_trim_threshold_reads_the_free_heap():
    free = heap.free_heap_bytes()
    assert isinstance(free, int) and free >= 0
    assert heap.trim(min_free=1 << 50) is False  # nobody has a petabyte of free heap
    assert heap.trim(min_free=0) is True
    # fragment the heap: 128 MB in 64 KB blocks (heap, not mmap), every other one freed, so the holes cannot
    # merge into the top chunk that free() trims by itself; 64 MB free then makes a 32 MB trim point fire
    blocks = [bytearray(1 << 16) for _ in range(2048)]
    keep = blocks[1::2]
    del blocks
    assert heap.free_heap_bytes() >= 32 << 20
    assert heap.trim(min_free=32 << 20) is True
    del keep


@glibc
def test_small_models_are_not_trimmed(monkeypatch):
    _, model = _model(layers=4)
    assert heap.HeapTrimmer(model, every=2).active is False  # ~0.03M parameters < MIN_PARAMS
    monkeypatch.setattr(heap, "MIN_PARAMS", 0)
    assert heap.HeapTrimmer(model, every=2).active is True
