"""Checkpoints: the model as safetensors + the tokenizer + a small JSON of where training was."""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from pipeline.store import atomic_write_bytes

STATE_FILE = "trainer_state.json"


def save_checkpoint(model, tokenizer, folder: str | Path, state: dict) -> Path:
    """Write `folder` (model.safetensors, config.json, tokenizer files, trainer_state.json).

    The model goes to a temporary sibling folder that replaces `folder` at the end, so an interrupted save
    never leaves a half-written checkpoint under the final name.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {}
    # transformers < 5 wrote pickle files unless asked; 5.x always writes safetensors and dropped the flag.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(tmp, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    atomic_write_bytes(tmp / STATE_FILE, json.dumps(state, indent=1, default=str).encode())
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(folder)
    return folder


def read_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())
