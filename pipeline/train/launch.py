"""Which trainer a TrainConfig gets: the data-parallel one under torchrun (or `distributed: ddp|fsdp`), else the
single-process Trainer. Kept apart from both classes so the subclass module imports the base and nothing imports
back (trainer.py knows nothing of pipeline/distributed/ddp.py)."""
from __future__ import annotations

from pipeline.distributed.ddp import DistributedTrainer, distributed_mode
from pipeline.train.config import TrainConfig
from pipeline.train.reward import RewardTrainer
from pipeline.train.trainer import Trainer, TrainResult


def make_trainer(cfg: TrainConfig, **kwargs) -> Trainer:
    """`kwargs` as Trainer's: model, tokenizer, ref_model passed in instead of loaded from cfg paths."""
    if cfg.mode == "reward":  # a scalar-head verifier: its own loop, one process (pipeline/train/reward.py)
        return RewardTrainer(cfg, **kwargs)  # type: ignore[return-value]
    cls = DistributedTrainer if distributed_mode(cfg) != "none" else Trainer
    return cls(cfg, **kwargs)


def train(cfg: TrainConfig, **kwargs) -> TrainResult:
    return make_trainer(cfg, **kwargs).train()
