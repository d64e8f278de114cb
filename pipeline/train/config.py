"""`TrainConfig`: everything one training run needs, with documented defaults (a YAML file maps onto it)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config_io import FiniteFloat, read_config, validate
from pipeline.train.data import TokenizeConfig
from pipeline.train.losses import ListLossConfig, LossConfig
from pipeline.train.reward_config import RewardConfig


_Beta = Annotated[FiniteFloat, Field(ge=0, lt=1)]

# Loss settings the trainer does not feed yet: each needs a tensor that the forward pass does not produce (per-token
# log-probs for LD-DPO, the squared-probability mass for WPO). Set, they would fail at the first step; refused at
# load instead. `pair_loss` implements them for callers that build a PairBatch with those tensors.
UNFED_LOSS_SETTINGS = {
    "ld_alpha": (None, "LD-DPO needs per-token log-probs, which the trainer's fused head does not return"),
    "use_weighting": (False, "WPO needs each completion's squared-probability mass, which the trainer does not "
                      "compute"),
    "wpo_clamp": (False, "it only acts with use_weighting (WPO), which the trainer does not support"),
    "ld_on_reference": (True, "it only acts with ld_alpha (LD-DPO), which the trainer does not support"),
}


class TrainConfig(BaseModel):
    """One preference (or SFT) training run. Defaults follow TRL's DPOTrainer where it has one."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., description="policy: a local HF model folder or a built-in name (tiny-policy)")
    ref_model: str | None = Field(None, description="reference model folder; None = the initial policy")
    data: str = Field(..., description="pair or ranked-list table: .parquet, a folder of shards, or .jsonl")
    data_kind: Literal["auto", "pairs", "lists"] = Field(
        "auto", description="auto: a `responses` column means ranked lists, else pairs")
    mode: Literal["preference", "sft", "reward"] = Field(
        "preference", description="sft: token-mean NLL of prompt -> chosen (or `completion`) only; no reference. "
        "reward: a scalar-head reward model (verifier) on pair tables, saved as an "
        "AutoModelForSequenceClassification folder (settings: the `reward` section; docs/reward-model.md)")
    sft_column: str | None = Field(
        None, description="mode sft: the column to train on (e.g. `gold` of a bundled-task prompts table); "
        "None = `completion`, else `chosen`")
    pair_filter: Literal["none", "hard"] = Field(
        "none", description="hard: train only on the pairs the reference ranks wrong (log p_ref(rejected) >= "
        "log p_ref(chosen)), i.e. the mistakes the policy itself is likely to make; computes the reference "
        "log-probs even for losses that do not use them")
    output_dir: str = Field("runs/train", description="checkpoints, metrics.jsonl and the final model")

    loss: LossConfig = Field(default_factory=LossConfig, description="pairwise loss (sigmoid DPO, beta 0.1)")
    list_loss: ListLossConfig = Field(default_factory=ListLossConfig, description="ranked-list loss")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="rows -> token ids")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="mode reward: objective, held-out split")

    lr: FiniteFloat = Field(1e-6, gt=0, description="peak learning rate (TRL's default)")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="after warmup: linear or cosine decay to 0, or constant")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 over this many optimizer steps")
    min_lr_ratio: FiniteFloat = Field(
        0.0, ge=0, le=1, description="linear or cosine decay ends at lr * this at the last step instead of 0 "
        "(the tiny policy's recipe: 0.05)")
    weight_decay: FiniteFloat = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    adam_betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1)")
    adam_eps: FiniteFloat = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: FiniteFloat | None = Field(
        1.0, gt=0, description="clip the global grad norm; None = no clipping")
    epochs: FiniteFloat = Field(1.0, gt=0, description="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    micro_batch: int = Field(4, ge=1, description="pairs (lists, sft rows) per forward")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    shuffle: bool = Field(True, description="shuffle groups every epoch (seeded)")
    length_bucketing: bool = Field(
        False, description="mode sft: each epoch, shuffle the rows, sort every window of 50 global batches by "
        "length and shuffle the batches (less padding; the tiny policy's recipe). Seeded by `seed`")
    seed: int = Field(42, ge=0, description="seed of the shuffle, dropout and initialisation")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU; weights and optimizer stay fp32")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel of the loaded model (sdpa: causal flash kernel, no [T, T] scores)")
    share_prompt: bool = Field(
        False, description="one row per pair/list: the prompt is computed once and every completion attends to "
        "it through a block mask (same log-probs; fewer tokens when prompts are long)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward (less memory, ~1/3 more compute)")
    lean_activations: bool = Field(
        True, description="CPU fp32: Llama-family RMSNorm and SwiGLU MLP keep fewer tensors for the backward and "
        "recompute the rest (elementwise); same forward, gradients to float rounding (pipeline/train/lean.py). "
        "Not applied with gradient_checkpointing (no lower peak there, and slower)")
    head_chunk_tokens: int = Field(1024, ge=1, description="tokens per chunk of the fused LM head")
    sdpa_backends: Literal["auto"] | list[Literal["flash", "efficient", "cudnn", "math"]] | None = Field(
        "auto", description="attention kernels scaled_dot_product_attention may pick, in torch's order of "
        "preference; None = torch's default (cuDNN first on Hopper, which builds a plan for every new sequence "
        "shape: hundreds of ms each); auto = [flash, efficient, math] on CUDA (flash for the causal separate "
        "layout, efficient for share_prompt's masks), torch's default on CPU")
    head_kernel: Literal["auto", "torch", "triton"] = Field(
        "auto", description="elementwise work of the chunked head: triton (fused kernels, CUDA), torch, or auto "
        "(triton on CUDA when it imports, else torch; pipeline/train/head.py)")
    heap_trim_every: int = Field(
        6, ge=0, description="CPU: hand freed heap back to the OS (glibc malloc_trim) in the backward of every "
        "N-th decoder layer, at each micro-batch start and at the end of the forward, wherever >= 32 MB is free; "
        "bounds the peak that freed but resident heap pages add (docs/trainer.md, pipeline/train/heap.py). 0 = off")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch's default)")

    ref_cache_dir: str | None = Field(None, description="reference log-prob cache; None = <data folder>/refcache")
    ref_batch_size: int = Field(16, ge=1, description="groups per reference forward")

    drift_probe: int = Field(256, ge=0, description="log-prob drift probe: the first N groups of the data are "
                             "scored by the policy before and after training; train_summary.json gets the mean "
                             "change per slot (chosen, rejected, ...) in nats. 0 = off")
    metrics_every: int = Field(1, ge=1, description="write a metrics.jsonl line every N optimizer steps")
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps (None = only at the end)")
    save_final: bool = Field(True, description="save the final model + tokenizer into output_dir")
    progress: bool = Field(True, description="show a progress bar")
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")

    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="data parallel under torchrun: ddp, or fsdp (FSDP2, sharded params/grads/optimizer); "
        "auto = ddp when WORLD_SIZE > 1, else one process. The global batch stays micro_batch x grad_accum")
    resume_from: str | None = Field(
        None, description="continue from a checkpoint-<step> folder (weights, optimizer, step), or 'latest' in "
        "output_dir; the other fields must match the run that wrote it")

    @field_validator("loss")
    @classmethod
    def _fed(cls, loss: LossConfig) -> LossConfig:
        for name, (off, why) in UNFED_LOSS_SETTINGS.items():
            if getattr(loss, name) != off:
                raise ValueError(f"{name}={getattr(loss, name)!r} is not supported by the trainer: {why}; "
                                 f"leave it at {off!r}")
        return loss

    @field_validator("list_loss")
    @classmethod
    def _label_range(cls, list_loss: ListLossConfig) -> ListLossConfig:
        span = list_loss.tpo_label_range
        if span is not None and not span[0] < span[1]:  # TPO divides by the range's width
            raise ValueError(f"tpo_label_range {tuple(span)} must run from low to high")
        return list_loss

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.mode == "sft" and self.data_kind == "lists":
            raise ValueError("mode sft trains on pairs' chosen side or a completion column, not ranked lists")
        if self.mode == "reward" and self.data_kind == "lists":
            raise ValueError("mode reward trains on pair tables, not ranked lists")
        if self.sft_column is not None and self.mode != "sft":
            raise ValueError("sft_column applies to mode sft only")
        if self.length_bucketing and (self.mode != "sft" or not self.shuffle):
            raise ValueError("length_bucketing applies to mode sft with shuffle on")
        if self.pair_filter != "none" and (self.mode != "preference" or self.data_kind == "lists"):
            raise ValueError("pair_filter applies to preference pairs, not mode sft / reward or ranked lists")
        if self.share_prompt and self.attn_implementation == "flash_attention_2":
            raise ValueError("share_prompt needs a block attention mask, which flash_attention_2 cannot take: "
                             "use sdpa or eager")
        return self


def merge(base: dict, over: dict) -> dict:
    """`over` wins, recursively for nested sections (loss, tokenize, ...)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML/JSON config file (or none); `overrides` (e.g. CLI options, nested dicts) win. Bad fields raise
    InputError naming the file and the dotted field."""
    raw = read_config(path, "training config") if path is not None else {}
    return parse_config(merge(raw, overrides or {}), file=str(path) if path is not None else None)


def parse_config(raw: dict, file: str | None = None, prefix: tuple = ()) -> TrainConfig:
    """`raw` as a TrainConfig; `prefix` is where it sits in a larger file (a run config's `train.2.config`)."""
    return validate(TrainConfig, raw, file=file, prefix=prefix, what="training config")
