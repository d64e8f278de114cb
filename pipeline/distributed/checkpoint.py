"""Resumable checkpoints: model, optimizer state, step and loss state, for 1 process, DDP and FSDP2 alike.

    checkpoint-<step>/model.safetensors        full (unsharded) weights, loadable by from_pretrained
    checkpoint-<step>/optimizer.safetensors    AdamW moments keyed by parameter name ("<name>::exp_avg")
    checkpoint-<step>/trainer_state.json       step, config, loss state, optimizer param groups

Tensors are stored as safetensors and metadata as JSON, so resuming never unpickles a file. State is keyed by
parameter name, not by optimizer index, so a checkpoint written by 2 FSDP2 ranks resumes on 1 process and back.
Under FSDP2 the full tensors are gathered (a collective: every rank calls save) and rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import deque
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.train.checkpoint import STATE_FILE, read_state, save_checkpoint

OPTIM_FILE = "optimizer.safetensors"
# Fields that may change between a run and its resume without changing the trajectory.
RESUME_FREE_FIELDS = {"resume_from", "output_dir", "progress", "save_every", "save_final", "metrics_every",
                      "distributed", "threads", "device", "ref_cache_dir", "ref_batch_size"}


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (a collective under FSDP2)."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {param name: {key: tensor}}, "param_groups": [{..., "params": [names]}]} (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, st in osd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}::{key}"] = t.detach().cpu().contiguous()
    return tensors, osd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for flat, t in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = t
    return {"state": state, "param_groups": groups}


def loss_state_dict(loss_state) -> dict:
    return {k: list(v) if isinstance(v, deque) else v for k, v in dataclasses.asdict(loss_state).items()}


def restore_loss_state(loss_state, saved: dict) -> None:
    for f in dataclasses.fields(loss_state):
        if f.name in saved and f.name != "max_steps":
            value = getattr(loss_state, f.name)
            setattr(loss_state, f.name, deque(saved[f.name], maxlen=value.maxlen) if isinstance(value, deque)
                    else saved[f.name])


class _FullStateModel:
    """Looks like the model to `save_checkpoint`, but writes the gathered weights and the optimizer file.

    Both land in the temporary folder that `save_checkpoint` renames at the end, so a checkpoint is complete
    (weights + optimizer + state) or absent.
    """

    def __init__(self, model, weights: dict, optim: tuple[dict, list] | None):
        self.model, self.weights, self.optim = model, weights, optim

    def save_pretrained(self, folder, **kwargs) -> None:
        self.model.save_pretrained(folder, state_dict=self.weights, **kwargs)
        if self.optim is not None:
            from safetensors.torch import save_file
            save_file(self.optim[0], str(Path(folder) / OPTIM_FILE))


def save_training_checkpoint(trainer, folder: Path, state: dict, optimizer=None) -> None:
    """Every rank calls this (FSDP2 gathers); only the main rank writes."""
    weights = full_model_state(trainer.model)
    osd = full_optimizer_state(trainer.model, optimizer) if optimizer is not None else None
    if not getattr(trainer, "is_main", True):  # full state dicts are gathered on rank 0 only
        return
    optim = _flatten_optimizer(osd) if osd is not None else None
    state = {**state, "loss_state": loss_state_dict(trainer.loss_state)}
    if optim is not None:
        state["optimizer_param_groups"] = optim[1]
    save_checkpoint(_FullStateModel(trainer.model, weights, optim), trainer.tokenizer, folder, state)


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """A checkpoint folder, or 'latest' = the highest checkpoint-<step> in output_dir."""
    if resume_from != "latest":
        folder = Path(resume_from)
        if not (folder / STATE_FILE).exists():
            raise InputError(f"not a training checkpoint (no {STATE_FILE})", file=str(folder), column="resume_from")
        return folder
    found = sorted((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).exists())
    if not found:
        raise InputError("resume_from: latest, but no checkpoint-<step> folder here", file=str(output_dir),
                         column="resume_from")
    return found[-1][1]


def _check_same_run(saved: dict, current: dict, folder: Path) -> None:
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k))
    if diff:
        raise InputError(f"the checkpoint was written by another training config (fields {diff} differ); a resume "
                         f"must keep them to continue the same trajectory", file=str(folder / STATE_FILE))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(folder / f)))
    return weights


def load_training_checkpoint(trainer, resume_from: str, optimizer) -> int:
    """Load weights, optimizer and loss state into a set-up trainer; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    folder = resolve_checkpoint(resume_from, trainer.cfg.output_dir)
    state = read_state(folder)
    _check_same_run(state.get("config", {}), trainer.cfg.model_dump(mode="json"), folder)
    if not (folder / OPTIM_FILE).exists() or "optimizer_param_groups" not in state:
        raise InputError(f"no optimizer state ({OPTIM_FILE}): a final model cannot be resumed, only a "
                         f"checkpoint-<step>", file=str(folder))
    weights = _read_weights(folder)
    # save_pretrained drops tied copies (e.g. lm_head = embed_tokens); they come back through the tie.
    aliases = {n for n, p in trainer.model.named_parameters(remove_duplicate=False)} - set(weights)
    opts = StateDictOptions(full_state_dict=True, strict=not aliases)
    set_model_state_dict(trainer.model, weights, options=opts)
    from safetensors.torch import load_file
    osd = _unflatten_optimizer(load_file(str(folder / OPTIM_FILE)), state["optimizer_param_groups"])
    set_optimizer_state_dict(trainer.model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    restore_loss_state(trainer.loss_state, state.get("loss_state", {}))
    return int(state["step"])
