"""The stage engine: sharding, resume, progress, validation and writing, so stages only transform rows.

`run_stage` splits the input into fixed shards (in input order), skips shards the manifest lists as done, runs
the stage on the rest, validates every output table against its declared schema and writes it through the
store. Shard seeds derive from the fingerprint and the shard index, so a resumed run equals an uninterrupted
one. Rows with status `failed` are counted; above `fail_threshold` the run fails with a summary (the rows stay
in the store for inspection).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.fingerprint import derive_seed, fingerprint, fingerprint_inputs
from pipeline.stage import StageConfig, StageContext, StageSpec
from pipeline.store import RunStore, StageStore, input_digest
from schemas import validate
from schemas.errors import InputError, PrefpipeError


class StageFailed(PrefpipeError):
    """Too many rows failed; the summary says how many and why."""


@dataclass
class StageResult:
    store: StageStore
    summary: dict

    def read(self, output: str = "main") -> pa.Table:
        return self.store.read(output)


def stage_fingerprint(spec: StageSpec, cfg: StageConfig, backend: Any | None) -> tuple[str, dict]:
    inputs = fingerprint_inputs(
        spec.name, cfg.version, cfg.fingerprint_config(),
        model_id=getattr(backend, "model_id", None), weights_hash=getattr(backend, "weights_hash", None),
        sampling=cfg.sampling(), templates=cfg.templates())
    return fingerprint(inputs), inputs


def _status_counts(table: pa.Table) -> dict[str, int]:
    if "status" not in table.column_names or table.num_rows == 0:
        return {"ok": table.num_rows} if table.num_rows else {}
    counts = pc.value_counts(table.column("status"))
    return {v.as_py(): c.as_py() for v, c in zip(counts.field("values"), counts.field("counts"))}


class _RichBar:
    """A redrawn bar with elapsed time and ETA, on a terminal."""

    def __init__(self, total: int, description: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.prog.start()
        self.task = self.prog.add_task(description, total=total)

    def advance(self, n: int) -> None:
        self.prog.advance(self.task, n)

    skip = advance  # rich's ETA is a windowed rate: one jump at the start barely moves it

    def stop(self) -> None:
        self.prog.stop()


class _LineBar:
    """Off a terminal (a flow's log, a file) a redrawn bar shows nothing until the end: lines with an ETA."""

    def __init__(self, total: int, description: str):
        from pipeline.progress import ProgressLine

        self.line = ProgressLine(f"stage {description}", total, "rows")

    def advance(self, n: int) -> None:
        self.line.update(n)

    def skip(self, n: int) -> None:
        self.line.skip(n)

    def stop(self) -> None:
        pass


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    import sys

    return (_RichBar if sys.stderr.isatty() else _LineBar)(total, description)


def run_stage(spec: StageSpec, rows: pa.Table, cfg: StageConfig, backend: Any | None, store: RunStore, *,
              shard_size: int = 64, fail_threshold: float = 0.01, overwrite: bool = False,
              input_file: str | None = None, progress: bool = True, on_shard=None,
              folder: str | None = None, runner=None) -> StageResult:
    """Run `spec` over `rows` into `store/<folder or spec.name>`; resumable; returns the folder and a summary.

    `runner(spec, cfg, work)` may compute the pending shards elsewhere (e.g. Ray actors,
    pipeline/distributed/ray_runner.py): `work` is a list of (index, rows, ctx); it yields (index, outputs) in
    any order. This process stays the only writer, so the manifest never races.
    """
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    if spec.needs_backend and backend is None:
        raise InputError(f"stage '{spec.name}' needs a model backend")
    rows = validate(rows, spec.input_kind, file=input_file)
    if spec.id_column not in rows.column_names:
        raise InputError(f"missing id column for stage '{spec.name}'", file=input_file, column=spec.id_column)
    fp, fp_inputs = stage_fingerprint(spec, cfg, backend)
    stage_store = store.stage(folder or spec.name)
    fresh = not stage_store.dir.exists() and not store.root.exists()  # nothing of this run on disk yet
    fresh_stage = not stage_store.dir.exists()
    manifest = stage_store.begin(fingerprint=fp, fingerprint_inputs=fp_inputs, outputs=spec.outputs,
                                 shard_size=shard_size, n_input_rows=rows.num_rows, overwrite=overwrite)
    shard_size = manifest["shard_size"]  # a resumed run keeps the shard layout it started with
    if manifest["n_input_rows"] != rows.num_rows:
        raise _input_changed(stage_store, manifest["n_input_rows"], rows.num_rows)
    ids = rows.column(spec.id_column).to_pylist()
    n_shards = (rows.num_rows + shard_size - 1) // shard_size
    bar = _progress(rows.num_rows, spec.name, progress)
    try:
        work = []
        for index in range(n_shards):
            lo, hi = index * shard_size, min(rows.num_rows, (index + 1) * shard_size)
            done = manifest["shards"].get(str(index))
            if done is not None:
                if done["input_digest"] != input_digest(ids[lo:hi]):
                    raise _input_changed(stage_store, None, None, shard=index)
                if bar:
                    bar.skip(hi - lo)
                continue
            ctx = StageContext(fingerprint=fp, shard_index=index, seed=derive_seed(cfg.seed, fp, index),
                               model_id=getattr(backend, "model_id", None))
            work.append((index, rows.slice(lo, hi - lo), ctx))
        results = (runner(spec, cfg, work) if runner is not None else
                   ((i, spec.run(part, cfg, backend, ctx)) for i, part, ctx in work))  # lazy: one shard at a time
        for index, outputs in results:
            lo, hi = index * shard_size, min(rows.num_rows, (index + 1) * shard_size)
            missing = set(spec.outputs) - set(outputs)
            if missing:
                raise PrefpipeError(f"stage '{spec.name}' returned no output {sorted(missing)}")
            tables = {name: validate(outputs[name], kind, file=f"<stage {spec.name} output '{name}'>")
                      for name, kind in spec.outputs.items()}
            stage_store.write_shard(manifest, index, tables, input_ids=ids[lo:hi],
                                    extra={"status": {n: _status_counts(t) for n, t in tables.items()}})
            if bar:
                bar.advance(hi - lo)
            if on_shard is not None:
                on_shard(index)
    except InputError:
        # bad input a stage found in its first shard (e.g. a malformed `meta` record): leave nothing behind
        # rather than a stage folder holding only an unfinished manifest
        if fresh_stage and not manifest["shards"]:
            stage_store.discard(remove_root=fresh)
        raise
    finally:
        if bar:
            bar.stop()
    summary = summarize(stage_store, manifest)
    if stage_store.recomputed:  # shards found missing or changed on resume: said, never silent
        summary["recomputed_shards"] = dict(stage_store.recomputed)
    stage_store.finish(manifest, summary)
    main = summary["status"].get("main", {})
    total = sum(main.values())
    if total and main.get("failed", 0) / total > fail_threshold:
        raise StageFailed(f"stage '{spec.name}': {main['failed']} of {total} rows failed "
                          f"(threshold {fail_threshold:.1%}); first errors: {summary['first_errors']}")
    return StageResult(stage_store, summary)


def summarize(stage_store: StageStore, manifest: dict) -> dict:
    status: dict[str, Counter] = {}
    for shard in manifest["shards"].values():
        for output, counts in shard.get("status", {}).items():
            status.setdefault(output, Counter()).update(counts)
    first_errors: list[str] = []
    if status.get("main", {}).get("failed"):
        for batch in stage_store.iter_batches("main", columns=["status", "error"]):
            t = pa.Table.from_batches([batch])
            errs = pc.filter(t.column("error"), pc.equal(t.column("status"), "failed")).to_pylist()
            first_errors.extend(e for e in errs if e)
            if len(first_errors) >= 5:
                break
    return {"status": {k: dict(v) for k, v in status.items()},
            "rows": {o: stage_store.num_rows(o) for o in manifest["outputs"]},
            "first_errors": first_errors[:5]}


def _input_changed(stage_store: StageStore, expected, got, shard: int | None = None):
    from pipeline.store import StoreError
    where = f"shard {shard}" if shard is not None else f"{expected} input rows recorded, {got} given"
    return StoreError(f"the input of stage '{stage_store.name}' in {stage_store.root} changed since the run "
                      f"started ({where}); use a new run directory or --overwrite")


def read_input(path: str | Path, kind: str = "prompts") -> pa.Table:
    """Read a stage input: a run-store stage folder (`folder@output` for another output than main, e.g.
    `runs/x/tree@trees`), or a file.

    Prompts come through the prompt loaders (JSONL, Parquet, `datasets` folder). Other kinds are read from
    Parquet or JSONL; `validate` then checks them against their schema.
    """
    folder, at, output = str(path).rpartition("@")
    if at and (Path(folder) / "manifest.json").exists():
        store = StageStore(Path(folder).parent, Path(folder).name)
        outputs = store.manifest()["outputs"]
        if output not in outputs:
            raise InputError(f"the stage has no output {output!r} (it has {sorted(outputs)})", file=folder)
        return store.read(output)
    path = Path(path)
    if (path / "manifest.json").exists():
        return StageStore(path.parent, path.name).read()
    if kind == "prompts":
        from pipeline.tasks.loaders import load_prompts
        return load_prompts(path)
    if not path.exists():
        raise InputError("no such file or directory", file=str(path))
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read parquet (truncated or not parquet?): {e}", file=str(path)) from None


def read_jsonl(path: Path) -> pa.Table:
    """JSON Lines into a table; errors name the line (1-based) and, for type clashes, the column."""
    from pipeline.jsonl import parse_record

    records = []
    try:
        raw_lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=str(path)) from None
    for line_no, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"invalid UTF-8 at byte {e.start}", file=str(path), row=line_no) from None
        if not text.strip():
            continue
        records.append(parse_record(text, str(path), line_no))
    if not records:
        raise InputError("empty file: no records", file=str(path))
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
        for column in {k for r in records for k in r}:
            kinds = [type(r.get(column)).__name__ for r in records if r.get(column) is not None]
            for i, k in enumerate(kinds):
                if k != kinds[0]:
                    raise InputError(f"mixed value types ({kinds[0]} then {k}): {e}", file=str(path),
                                     row=i + 1, column=column) from None
        raise InputError(f"cannot build a table: {e}", file=str(path)) from None
