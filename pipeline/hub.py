"""Hugging Face Hub export (DESIGN §8): a run directory -> an export folder -> (optionally) a Hub dataset repo.

    export/
      README.md                                   dataset card (hub_card.py)
      data/<config>/train-00000-of-00002.parquet  one config per stage output holding pairs or lists
      data/<config>/test-00000-of-00001.parquet   only with test_fraction > 0

Config names: the stage name for its main output (`tree-search`), `<stage>-<output>` for others
(`tree-search-lists`). Only rows with status `ok` are exported; the card counts the rest.

`push_export` uploads the folder with `HfApi.create_repo` + `upload_folder`. The token comes from an
environment variable (HF_TOKEN by default) or the Hugging Face login; it is passed to the client only, is never
logged, and the folder is checked not to contain it before anything is sent.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import InputError, PrefpipeError
from pipeline.fingerprint import derive_seed
from pipeline.hub_card import (CARD_MARKER, ConfigExport, StageInfo, default_limitations, front_matter, list_stats,
                               pair_stats, render_card)
from pipeline.store import RunStore, StageStore, StoreError
from pipeline.store_cli import _status_from_shards

EXPORT_KINDS = ("pairs", "lists")


class ExportConfig(BaseModel):
    """How a run becomes an export folder. Every field has a default that gives a usable dataset."""

    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="Share of prompts in a `test` split (0: train only). Chosen by a "
                                             "seeded hash of prompt_id, so one prompt never spans both splits.")
    seed: int = Field(0, description="Seed of the train/test assignment.")
    rows_per_file: int = Field(100_000, ge=1, description="Most rows in one parquet file of a split.")
    stages: list[str] | None = Field(None, description="Export only these stages (default: every stage with "
                                                       "pairs or lists).")
    default_config: str | None = Field(None, description="Config `load_dataset(folder)` loads without a name "
                                                         "(default: the pairs config with the most rows).")
    license: str = Field("apache-2.0", description="License id in the card's front matter.")
    pretty_name: str | None = Field(None, description="Title of the card (default: the run directory's name).")
    extra_limitations: list[str] = Field(default_factory=list,
                                         description="Lines added to the card's Limitations section.")
    allow_incomplete: bool = Field(False, description="Export stages whose run has not finished.")


@dataclass
class ExportResult:
    folder: Path
    configs: list[ConfigExport]
    stages: list[StageInfo]

    @property
    def card_path(self) -> Path:
        return self.folder / "README.md"


# ---- reading the run ---------------------------------------------------------------------------------------
def config_name(stage: str, output: str) -> str:
    return stage if output == "main" else f"{stage}-{output}"


def _status_counts(manifest: dict, output: str) -> dict[str, int]:
    summary = (manifest.get("summary") or {}).get("status", {}).get(output)
    # An unfinished stage has no summary yet; its shards still carry their counts.
    return dict(summary) if summary is not None else _status_from_shards(manifest, output)


def stage_info(st: StageStore) -> StageInfo:
    m = st.manifest()
    return StageInfo(name=st.name, complete=bool(m.get("complete")), n_input_rows=m.get("n_input_rows", 0),
                     outputs=dict(m["outputs"]), rows={o: st.num_rows(o) for o in m["outputs"]},
                     status={o: _status_counts(m, o) for o in m["outputs"]},
                     fingerprint_inputs=m.get("fingerprint_inputs") or {},
                     first_errors=list((m.get("summary") or {}).get("first_errors") or []))


def open_run(run_dir: str | Path, only: list[str] | None = None) -> tuple[RunStore, list[StageInfo]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("run directory does not exist (expected runs/<run>/ with one folder per stage)",
                         file=str(run_dir))
    store = RunStore(run_dir)
    names = store.stages()
    if not names:
        raise InputError("no stages in this run directory (no <stage>/manifest.json)", file=str(run_dir))
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise InputError(f"stage(s) {missing} not in the run; it has {names}", file=str(run_dir))
        names = [n for n in names if n in only]
    try:
        return store, [stage_info(store.stage(n)) for n in names]
    except StoreError as e:
        raise InputError(str(e), file=str(run_dir)) from None


def export_table(table: pa.Table) -> pa.Table:
    """The ok rows in plain types: dictionary columns become strings, which every `datasets` version reads."""
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "ok"))
    fields = [pa.field(f.name, f.type.value_type, f.nullable, f.metadata) if pa.types.is_dictionary(f.type) else f
              for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def split_mask(prompt_ids: pa.Array, fraction: float, seed: int) -> pa.Array:
    """True where the row goes to the test split: a seeded hash of prompt_id, independent of row order."""
    bound = fraction * 2**63
    unique = pc.unique(prompt_ids).to_pylist()  # hash each prompt once, however many rows it has
    test_ids = pa.array([pid for pid in unique if derive_seed("prefpipe-export-split", seed, pid) < bound],
                        prompt_ids.type)
    return pc.is_in(prompt_ids, value_set=test_ids)


# ---- writing -----------------------------------------------------------------------------------------------
def _write_split(table: pa.Table, folder: Path, config: str, split: str, rows_per_file: int) -> list[str]:
    n_files = max(1, math.ceil(table.num_rows / rows_per_file))
    out = []
    for i in range(n_files):
        rel = f"data/{config}/{split}-{i:05d}-of-{n_files:05d}.parquet"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(i * rows_per_file, rows_per_file), folder / rel, compression="zstd")
        out.append(rel)
    return out


def _export_config(store: RunStore, info: StageInfo, output: str, folder: Path, cfg: ExportConfig) -> ConfigExport:
    kind = info.outputs[output]
    name = config_name(info.name, output)
    table = export_table(store.stage(info.name).read(output))
    ce = ConfigExport(name=name, stage=info.name, output=output, kind=kind, status=info.status.get(output, {}))
    ce.stats = pair_stats(table) if kind == "pairs" else list_stats(table)
    parts = {"train": table}
    if cfg.test_fraction > 0:
        mask = split_mask(table.column("prompt_id"), cfg.test_fraction, cfg.seed)
        parts = {"train": table.filter(pc.invert(mask)), "test": table.filter(mask)}
    for split, part in parts.items():
        ce.splits[split] = part.num_rows
        ce.files[split] = _write_split(part, folder, name, split, cfg.rows_per_file)
    return ce


def _task_hint(store: RunStore, configs: list[ConfigExport]) -> str | None:
    """'arith' when the rows say they come from the bundled arithmetic task (its meta JSON names the task)."""
    for c in configs:
        table = store.stage(c.stage).read(c.output, columns=["extra"])
        for extra in table.column("extra").slice(0, 50).to_pylist():
            try:
                if json.loads(extra or "{}").get("task") == "arith":
                    return "arith"
            except (json.JSONDecodeError, AttributeError):
                continue
    return None


def _prepare_out(out: Path) -> None:
    """Refuse to overwrite anything but an earlier export (a folder whose README carries our marker)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError("export target exists and is not a folder", file=str(out))
    entries = [p for p in out.iterdir() if p.name not in (".cache",)]
    readme = out / "README.md"
    ours = readme.exists() and CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace")
    if entries and not ours:
        raise InputError("export folder is not empty and is not an earlier prefpipe export; choose another "
                         "--out", file=str(out))


def export_run(run_dir: str | Path, out: str | Path, cfg: ExportConfig | None = None, *,
               repo_id: str | None = None) -> ExportResult:
    """Build the export folder for `run_dir` at `out` (replacing an earlier export there)."""
    cfg = cfg or ExportConfig()
    out = Path(out)
    store, stages = open_run(run_dir, cfg.stages)
    targets = [(st, o) for st in stages for o, kind in st.outputs.items() if kind in EXPORT_KINDS]
    if not targets:
        kinds = {st.name: sorted(set(st.outputs.values())) for st in stages}
        raise InputError(f"no stage output holds pairs or ranked lists (stages and their output kinds: {kinds}); "
                         "run a pair-producing stage first", file=str(run_dir))
    incomplete = [st.name for st in stages if not st.complete]
    if incomplete and not cfg.allow_incomplete:
        raise InputError(f"stage(s) {incomplete} have not finished; resume them (rerun the same command) or "
                         "pass --allow-incomplete", file=str(run_dir))
    _prepare_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap at the end, so a failed export never leaves a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        configs = [_export_config(store, st, o, tmp, cfg) for st, o in targets]
        names = [c.name for c in configs]
        # The biggest pairs config is the one a user most likely wants from `load_dataset(repo)`.
        ranked = sorted(configs, key=lambda c: (c.kind != "pairs", -sum(c.splits.values()), c.name))
        default = cfg.default_config or ranked[0].name
        if default not in names:
            raise InputError(f"default config {default!r} is not one of the exported configs {names}")
        configs.sort(key=lambda c: (c.name != default, c.name))  # the default config first, then by name
        limitations = default_limitations(configs, stages, _task_hint(store, configs)) + cfg.extra_limitations
        tags = sorted({"preference", "dpo", "synthetic", "prefpipe", *(c.stage for c in configs)})
        meta = front_matter(configs, default_config=default, license=cfg.license, tags=tags,
                            pretty_name=cfg.pretty_name)
        card = render_card(title=cfg.pretty_name or Path(run_dir).resolve().name, meta=meta, configs=configs,
                           stages=stages, test_fraction=cfg.test_fraction, seed=cfg.seed,
                           limitations=limitations, repo_id=repo_id)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, configs, stages)


# ---- push --------------------------------------------------------------------------------------------------
class PushError(PrefpipeError):
    """The upload failed; the export folder is intact and the message says what to rerun."""


def resolve_token(token_env: str = "HF_TOKEN") -> str:
    """The token from `token_env`, else from the Hugging Face login. Never printed."""
    token = os.environ.get(token_env, "").strip()
    if not token:
        from huggingface_hub import get_token
        token = (get_token() or "").strip()
    if not token:
        raise InputError(f"no Hugging Face token: set the environment variable {token_env} or run `hf auth login`")
    return token


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "<token>") if token else text


def _check_no_token(folder: Path, token: str) -> None:
    needle = token.encode()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and needle in p.read_bytes():
            raise PushError(f"refusing to upload: {p.relative_to(folder)} contains the Hub token; remove it from "
                            "the run config and export again")


def push_export(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                token_env: str = "HF_TOKEN", endpoint: str | None = None,
                commit_message: str = "Upload preference dataset (prefpipe export)", rerun_hint: str = "") -> str:
    """Create the dataset repo (if needed) and upload the folder; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").exists():
        raise InputError("not an export folder (no README.md); run `prefpipe export` first", file=str(folder))
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputError(f"repo id must be USER/NAME or ORG/NAME, got {repo_id!r}")
    token = token or resolve_token(token_env)
    _check_no_token(folder, token)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                                 commit_message=commit_message)
    except Exception as e:  # the client raises many types (HTTP, value, OS); all mean "the push did not finish"
        reason = _scrub(f"{type(e).__name__}: {e}", token).strip().splitlines()
        hint = rerun_hint or f"prefpipe export RUN_DIR --out {folder} --repo {repo_id}"
        raise PushError(f"push to dataset repo {repo_id} failed ({' '.join(reason[:3])}). The export folder "
                        f"{folder} is intact; rerun `{hint}` to try again.") from None
    return str(getattr(info, "commit_url", info))
