"""SPA's iteration loop (a loop over the self-label stage and the trainer, so it lives in the top layer;
stages/self_label.py holds only the labelling stage). It follows SPA's `run_all.sh`:

    for i, X_i in enumerate(prompt_splits, 1):          # disjoint prompt splits, no replay of earlier data
        label X_i with r = log π_{i-1} − log π_SFT       (the self-label stage, iteration = i)
        π_i = DPO(init = π_{i-1}, ref = π_{i-1}, the self-labelled pairs)   (default loss "distill", SPA's
                                                          noise-aware self-refinement, at `beta`)

    records = spa_iterate(splits, policy="runs/pi0/final", sft_model="tiny-policy", run_dir="runs/spa")
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.backends import make_backend
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
from pipeline.train.config import merge, parse_config
from pipeline.train.launch import train
from stages.self_label import SelfLabelConfig, label_report


def spa_iterate(prompt_splits: list[pa.Table], *, policy: str, sft_model: str, run_dir: str | Path,
                label: SelfLabelConfig | None = None, train_overrides: dict | None = None, beta: float = 0.1,
                backend_kind: str = "transformers", shard_size: int = 64) -> list[dict]:
    """For each prompt split, label with (π_{i-1} vs the SFT model), then DPO from π_{i-1} with π_{i-1} as
    reference. `policy` is π_0 (a DPO-trained model: with π_0 = SFT every reward ties). Training follows SPA's
    recipe (loss "distill" at `beta`, lr 5e-7, 1 epoch); `train_overrides` overrides any TrainConfig field.
    Returns one record per iteration: the label folder, the label report, the new policy folder."""
    run_dir = Path(run_dir)
    label = label or SelfLabelConfig()
    records = []
    for i, prompts in enumerate(prompt_splits, 1):
        cfg = label.model_copy(update={"ref_model": sft_model, "iteration": i})
        backend = make_backend(backend_kind, policy)
        try:
            res = run_stage(get_stage("self-label"), prompts, cfg, backend, RunStore(run_dir / f"iter-{i}"),
                            shard_size=shard_size, progress=False)
        finally:
            backend.close()
        out_dir = run_dir / f"iter-{i}" / "train"
        tcfg = parse_config(merge({"model": policy, "ref_model": None, "data": str(res.store.dir),
                                   "output_dir": str(out_dir), "loss": {"loss_type": "distill", "beta": beta},
                                   "lr": 5e-7, "epochs": 1.0, "progress": False}, train_overrides or {}))
        train(tcfg)
        records.append({"iteration": i, "labels": str(res.store.dir), "summary": res.summary,
                        "report": label_report(res.read()), "policy_in": policy, "policy_out": str(out_dir / "final")})
        policy = str(out_dir / "final")
    return records
