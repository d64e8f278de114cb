"""Hugging Face Hub export (docs/export.md): a run directory -> an export folder -> (optionally) a Hub dataset repo.

    export/
      README.md                                   dataset card (hub_card.py)
      .prefpipe-export.json                       what this export wrote, and each config's format (hub_out.py)
      data/<config>/train-00000-of-00002.parquet  rows in TRL's formats (hub_rows.py)
      data/<config>/test-00000-of-00001.parquet   only with test_fraction > 0

Configs (hub_plan.py): the stage name for its main output (`tree-search`), `<stage>-<output>` for others
(`tree-search-lists`), `-steps` for step pairs, `-sft` / `gold-sft` for SFT rows. Only rows with status `ok`
are exported; the card counts the rest.

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
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import InputError, PrefpipeError
from pipeline.fingerprint import derive_seed
from pipeline.hub_card import (ConfigExport, StageInfo, default_limitations, front_matter, list_stats, pair_stats,
                               reduce_lists, reduce_pairs, reduce_sft, render_card, sft_stats)
from pipeline.hub_out import check_out, install, write_listing
from pipeline.hub_plan import EXPORT_KINDS, Source, config_name, gold_source, key_table, source_files, stage_sources
from pipeline.hub_rows import Renderer, load_renderer
from pipeline.store import RunStore, StageStore, StoreError
from pipeline.store_cli import _status_from_shards
from schemas import conform

FORMAT_CHOICES = ("auto", "conversational", "standard")


class ExportConfig(BaseModel):
    """How a run becomes an export folder. Every field has a default that gives a usable dataset."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "conversational", "standard"] = Field(
        "auto", description="Row format: conversational (TRL's prompt/chosen/rejected messages) or standard "
                            "(the chat template already applied to the prompt). auto: conversational when the "
                            "generator has a chat template. Step pairs are always standard (docs/export.md).")
    tokenizer: str | None = Field(None, description="Model folder or built-in name whose chat template renders "
                                                    "prompts (default: the generator the stages recorded).")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="Share of prompts in a `test` split (0: train only): the prompts "
                                             "first in a seeded hash order, round(fraction x prompts) of them, "
                                             "so one prompt never spans both splits.")
    seed: int = Field(0, description="Seed of the train/test assignment.")
    rows_per_file: int = Field(100_000, ge=1, description="Most rows in one parquet file of a split.")
    stages: list[str] | None = Field(None, description="Export only these stages (default: every stage with "
                                                       "pairs, lists or generations).")
    sft: bool = Field(True, description="Also export the SFT configs (chain-of-thought generations, "
                                        "intervention's corrected solutions, gold solutions).")
    default_config: str | None = Field(None, description="Config `load_dataset(folder)` loads without a name, or "
                                                         "a stage id (`tree`, `tree@lists`) to take its biggest "
                                                         "config (default: the pairs config with the most rows).")
    license: str = Field("apache-2.0", description="License id in the card's front matter.")
    pretty_name: str | None = Field(None, description="Title of the card (default: the run directory's name).")
    extra_limitations: list[str] = Field(default_factory=list,
                                         description="Lines added to the card's Limitations section.")
    allow_incomplete: bool = Field(False, description="Export stages whose run has not finished.")
    overwrite: bool = Field(False, description="Replace an earlier export at --out (only the files its listing "
                                               "names are removed).")


@dataclass
class ExportResult:
    folder: Path
    configs: list[ConfigExport]
    stages: list[StageInfo]

    @property
    def card_path(self) -> Path:
        return self.folder / "README.md"


# ---- reading the run ---------------------------------------------------------------------------------------
def _status_counts(manifest: dict, output: str) -> dict[str, int]:
    summary = (manifest.get("summary") or {}).get("status", {}).get(output)
    # An unfinished stage has no summary yet; its shards still carry their counts.
    return dict(summary) if summary is not None else _status_from_shards(manifest, output)


def stage_info(st: StageStore) -> StageInfo:
    m = st.manifest()
    if not isinstance(m.get("outputs"), dict) or not isinstance(m.get("shards"), dict):
        raise InputError("manifest has no `outputs` / `shards` mapping", file=str(st.manifest_path))
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


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """Dictionary columns as their value type: every `datasets` version reads plain strings."""
    fields = [pa.field(f.name, f.type.value_type, f.nullable, f.metadata) if pa.types.is_dictionary(f.type) else f
              for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def export_table(table: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """The ok rows of a stage table, in `schema` (default: its own schema with plain strings)."""
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "ok"))
    schema = schema or plain_schema(table.schema)
    cols = [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema.remove_metadata()).cast(schema)


def held_out_prompt_ids(prompt_ids: pa.Array, fraction: float, seed: int) -> pa.Array:
    """The test prompts: round(fraction x distinct prompts) of them, the first in a seeded hash order of their
    ids (independent of row order and sharding; a threshold on the hash would miss the fraction by chance)."""
    unique = pc.unique(prompt_ids).to_pylist()
    ranked = sorted(unique, key=lambda pid: (derive_seed("prefpipe-export-split", seed, pid), pid))
    return pa.array(ranked[:math.floor(fraction * len(unique) + 0.5)], prompt_ids.type)


# ---- writing -----------------------------------------------------------------------------------------------
class _SplitWriter:
    """Writes one split as `<split>-0000i-of-0000n.parquet`, `rows_per_file` rows per file, holding at most one
    file's rows in memory. The total is known up front (first pass), so the names can carry `-of-n`."""

    def __init__(self, folder: Path, config: str, split: str, total: int, rows_per_file: int):
        self.folder, self.config, self.split = folder, config, split
        self.rows_per_file, self.n_files = rows_per_file, math.ceil(total / rows_per_file)
        self.pending: list[pa.Table] = []
        self.pending_rows, self.paths = 0, []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._write(self.rows_per_file)

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        rel = f"data/{self.config}/{self.split}-{len(self.paths):05d}-of-{self.n_files:05d}.parquet"
        (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(0, n), self.folder / rel, compression="zstd")
        rest = table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.paths.append(rel)

    def close(self) -> list[str]:
        if self.pending_rows:  # an empty split gets no file: `datasets` cannot read a zero-row parquet file
            self._write(self.pending_rows)
        if len(self.paths) != self.n_files:
            raise PrefpipeError(f"export of {self.config}/{self.split}: wrote {len(self.paths)} files, planned "
                                f"{self.n_files} (the run changed during the export?)")
        return self.paths


@dataclass
class _Planned:
    """A config and its rows' keys (pass 1), before anything is written."""

    src: Source
    files: list[Path]
    keys: pa.Table          # ok rows of the files, key columns only
    mask: list[pa.Array]    # per file: which of its ok rows this config takes


def _ok(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("status"), "ok")) if "status" in table.column_names else table


def _plan(store: RunStore, run_dir: Path, stages: list[StageInfo], cfg: ExportConfig,
          renderer: Renderer) -> list[_Planned]:
    conversational = cfg.format == "conversational" or (cfg.format == "auto" and renderer.has_template)
    sources = [s for st in stages for o, kind in st.outputs.items() if kind in EXPORT_KINDS
               for s in stage_sources(st, o, renderer, conversational)
               if cfg.sft or s.kind != "sft"]
    gold = gold_source(run_dir) if cfg.sft else None
    sources += [gold] if gold else []
    planned, by_files = [], {}
    for src in sources:
        files = source_files(store, src, run_dir)
        key = tuple(files)
        if key not in by_files:  # a stage output's keys are read once for all its configs
            by_files[key] = [_ok(key_table([f])) for f in files]
        per_file = by_files[key]
        masks = [src.pick(t) for t in per_file]
        keys = pa.concat_tables([t.filter(m) for t, m in zip(per_file, masks)]) if per_file else None
        if keys is not None and keys.num_rows:
            planned.append(_Planned(src, files, keys, masks))
    names = [p.src.name for p in planned]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two stage outputs give the same config name(s) {dup}; rename a stage folder or "
                         "export with --stage", file=str(run_dir))
    return planned


def _export_schema(files: list[Path], kind: str | None) -> pa.Schema:
    """One schema for every shard (declared columns first, a stage's extra columns after, nulls promoted)."""
    unified = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="default")
    return plain_schema(conform(unified.empty_table(), kind).schema if kind else unified)


def _write_config(p: _Planned, folder: Path, test_ids: pa.Array | None, kind: str | None,
                  rows_per_file: int, info: StageInfo | None) -> ConfigExport:
    """Stream one config file by file into its split files, collecting the card's statistics."""
    src = p.src
    ce = ConfigExport(name=src.name, stage=src.stage, output=src.output or "gold", kind=src.kind,
                      format=src.format, status=info.status.get(src.output, {}) if info else {})
    ids = p.keys.column("prompt_id")
    in_test = pc.is_in(ids, value_set=test_ids) if test_ids is not None else None
    n_test = 0 if in_test is None else pc.sum(in_test).as_py() or 0
    totals = {"train": len(ids) - n_test} | ({"test": n_test} if test_ids is not None else {})
    if not ce.status:
        ce.status = {"ok": len(ids)}
    writers = {s: _SplitWriter(folder, src.name, s, n, rows_per_file) for s, n in totals.items()}
    schema = _export_schema(p.files, kind)
    reduce = {"pairs": reduce_pairs, "lists": reduce_lists, "sft": reduce_sft}[src.kind]
    reduced = []
    for path, mask in zip(p.files, p.mask):  # file by file: memory stays at about one shard plus one output file
        raw = pq.read_table(path)
        rows = export_table(conform(raw, kind, file=str(path)) if kind else raw, schema).filter(mask)
        reduced.append(reduce(rows))
        out = src.convert(rows)
        if test_ids is None:
            writers["train"].add(out)
            continue
        test = pc.is_in(rows.column("prompt_id"), value_set=test_ids)
        writers["train"].add(out.filter(pc.invert(test)))
        writers["test"].add(out.filter(test))
    ce.files = {s: paths for s, w in writers.items() if (paths := w.close())}
    ce.splits = dict(totals)
    stats_table = pa.concat_tables(reduced, promote_options="default")  # stages differ in optional columns
    ce.stats = {"pairs": pair_stats, "lists": list_stats, "sft": sft_stats}[src.kind](stats_table)
    return ce


def _task_hint(store: RunStore, configs: list[ConfigExport]) -> str | None:
    """'arith' when the rows come from the bundled arithmetic task: its prompt ids are `arith-<hash>`, and its
    meta JSON (which some stages copy into `extra`) names the task."""
    for c in configs:
        if c.stage == "inputs":
            continue
        first = next(store.stage(c.stage).iter_batches(c.output, batch_size=50, columns=["prompt_id", "extra"]),
                     None)
        if first is None:
            continue
        ids = first.column("prompt_id").to_pylist()  # an output without `extra` (SFT generations) gives ids only
        extras = first.column("extra").to_pylist() if "extra" in first.schema.names else []
        if ids and sum(str(i).startswith("arith-") for i in ids) > len(ids) // 2:
            return "arith"
        for extra in extras:
            try:
                if json.loads(extra or "{}").get("task") == "arith":
                    return "arith"
            except (json.JSONDecodeError, AttributeError):
                continue
    return None


def _generator(store: RunStore, stages: list[StageInfo]) -> str | None:
    """The model whose chat template the prompts were rendered with: the backend a stage recorded, else the
    first pairs' generator_model."""
    for st in stages:
        if st.fingerprint_inputs.get("model_id"):
            return str(st.fingerprint_inputs["model_id"])
    for st in stages:
        for o, kind in st.outputs.items():
            if kind == "pairs":
                first = next(store.stage(st.name).iter_batches(o, batch_size=1, columns=["generator_model"]), None)
                if first is not None and first.num_rows:
                    return first.column(0)[0].as_py()
    return None


def choose_default(configs: list[ConfigExport], wanted: str | None) -> str:
    """The default config: `wanted` (a config name, or a stage id / `id@output` meaning that output's biggest
    config), else the pairs config with the most rows."""
    by_size = sorted(configs, key=lambda c: (c.kind != "pairs", -sum(c.splits.values()), c.name))
    names = [c.name for c in configs]
    if wanted is None:
        return by_size[0].name
    if wanted in names:
        return wanted
    stage, _, output = wanted.partition("@")
    base = config_name(stage, output or "main")
    for c in by_size:
        if c.name in (base, f"{base}-steps"):
            return c.name
    raise InputError(f"default config {wanted!r} is not one of the exported configs {names} (nor a stage "
                     "output that has one)")


def export_run(run_dir: str | Path, out: str | Path, cfg: ExportConfig | None = None, *,
               repo_id: str | None = None) -> ExportResult:
    """Build the export folder for `run_dir` at `out` (replacing an earlier export there with overwrite)."""
    cfg = cfg or ExportConfig()
    out, run_dir = Path(out), Path(run_dir)
    store, stages = open_run(run_dir, cfg.stages)
    if not any(kind in EXPORT_KINDS for st in stages for kind in st.outputs.values()):
        kinds = {st.name: sorted(set(st.outputs.values())) for st in stages}
        raise InputError(f"no stage output holds pairs or ranked lists (stages and their output kinds: {kinds}); "
                         "run a pair-producing stage first", file=str(run_dir))
    incomplete = [st.name for st in stages if not st.complete]
    if incomplete and not cfg.allow_incomplete:
        raise InputError(f"stage(s) {incomplete} have not finished; resume them (rerun the same command) or "
                         "pass --allow-incomplete", file=str(run_dir))
    old_files = check_out(out, cfg.overwrite)
    renderer = load_renderer(cfg.tokenizer or _generator(store, stages))
    planned = _plan(store, run_dir, stages, cfg, renderer)
    if not planned:
        raise InputError(f"no ok rows to export: every pair/list row is failed or filtered "
                         f"({ {st.name: st.status for st in stages} })", file=str(run_dir))
    test_ids = None
    if cfg.test_fraction > 0:  # one set of test prompts for every config: no prompt in train of one, test of another
        all_ids = pa.chunked_array([p.keys.column("prompt_id").cast(pa.string()) for p in planned])
        test_ids = held_out_prompt_ids(all_ids, cfg.test_fraction, cfg.seed)
    infos = {st.name: st for st in stages}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and move it in at the end, so a failed export never leaves a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the export is meant to be shared
    try:
        configs = [_write_config(p, tmp, test_ids, infos[p.src.stage].outputs[p.src.output] if p.src.output
                                 else None, cfg.rows_per_file, infos.get(p.src.stage)) for p in planned]
        default = choose_default(configs, cfg.default_config)
        configs.sort(key=lambda c: (c.name != default, c.name))  # the default config first, then by name
        limitations = default_limitations(configs, stages, _task_hint(store, configs)) + cfg.extra_limitations
        tags = sorted({"preference", "dpo", "synthetic", "prefpipe", *(c.stage for c in configs)})
        meta = front_matter(configs, default_config=default, license=cfg.license, tags=tags,
                            pretty_name=cfg.pretty_name)
        card = render_card(title=cfg.pretty_name or run_dir.resolve().name, meta=meta, configs=configs,
                           stages=stages, test_fraction=cfg.test_fraction, seed=cfg.seed,
                           limitations=limitations, repo_id=repo_id)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        written = ["README.md"] + [f for c in configs for paths in c.files.values() for f in paths]
        write_listing(tmp, written, {c.name: {"format": c.format, "kind": c.kind, "stage": c.stage,
                                              "output": c.output, "default": c.name == default} for c in configs})
        install(tmp, out, old_files)
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
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise InputError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (HF_HUB_OFFLINE=0) to push")
    token = token or resolve_token(token_env)
    _check_no_token(folder, token)

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # create_repo(exist_ok=True) leaves an existing repo's visibility alone; never publish data the user
        # asked to keep private.
        if private and not api.repo_info(repo_id, repo_type="dataset").private:
            raise InputError(f"--private was asked but dataset repo {repo_id} already exists and is public; make "
                             "it private on the Hub first, or push without --private")
        # delete_patterns: data files of an earlier, larger export would otherwise stay in the repo and match
        # the card's `data/<config>/train-*` globs, duplicating rows.
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                                 commit_message=commit_message, delete_patterns=["data/*"])
    except InputError:
        raise
    except Exception as e:  # the client raises many types (HTTP, value, OS); all mean "the push did not finish"
        reason = _scrub(f"{type(e).__name__}: {e}", token).strip().splitlines()
        hint = rerun_hint or f"prefpipe export RUN_DIR --out {folder} --repo {repo_id} --overwrite"
        raise PushError(f"push to dataset repo {repo_id} failed ({' '.join(reason[:3])}). The export folder "
                        f"{folder} is intact; rerun `{hint}` to try again.") from None
    return str(getattr(info, "commit_url", info))
