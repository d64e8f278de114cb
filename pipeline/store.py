"""The run store: a run directory of stage folders holding parquet shards and a manifest (docs/store.md).

    runs/<run>/<stage>/part-00000.parquet   (main output; other outputs as <name>-00000.parquet)
    runs/<run>/<stage>/manifest.json

Every shard is written to a temporary name, fsynced and renamed; the manifest is rewritten the same way after
each shard. A shard counts only once the manifest lists it, so a process killed at any point leaves either the
old manifest (the shard is redone) or the new one (the shard is kept): no row is lost or written twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import SCHEMAS, conform
from schemas.errors import InputError, PrefpipeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreError(PrefpipeError):
    """The run directory is inconsistent with what was asked (e.g. a different fingerprint)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(path: Path, write) -> None:
    """`write(tmp_path)` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.
    A crash at any point leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def _dictionary_columns(table: pa.Table, sample: int = 2048) -> list[str]:
    """Columns worth dictionary-encoding: declared dictionaries and repetitive strings (checked on a sample).

    Parquet's default tries a dictionary for every column and falls back on high-cardinality text, which
    costs about a third of the write time on pair tables.
    """
    out = []
    head = table.slice(0, sample)
    for field in table.schema:
        if pa.types.is_dictionary(field.type):
            out.append(field.name)
        elif pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            col = head.column(field.name)
            if len(col) and pc.count_distinct(col).as_py() <= max(1, len(col) // 8):
                out.append(field.name)
    return out


def atomic_write_table(path: Path, table: pa.Table, *, compression: str = "zstd") -> None:
    _atomic_replace(path, lambda tmp: pq.write_table(table, tmp, compression=compression,
                                                     use_dictionary=_dictionary_columns(table)))


def input_digest(ids: list[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\x00")
    return h.hexdigest()


def shard_file(output: str, index: int) -> str:
    return f"{'part' if output == 'main' else output}-{index:05d}.parquet"


class StageStore:
    """One stage's folder: its manifest, its shards, and how to read them back."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = Path(root), name
        self.dir = self.root / name

    # ---- manifest -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"no stage '{self.name}' in run directory {self.root} "
                             f"(missing {self.manifest_path})") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"corrupt manifest {self.manifest_path}: {e}") from None

    def _write_manifest(self, manifest: dict) -> None:
        manifest["updated_at"] = time.time()
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())

    def begin(self, *, fingerprint: str, fingerprint_inputs: dict, outputs: dict[str, str],
              shard_size: int, n_input_rows: int, overwrite: bool = False) -> dict:
        """Open the stage for writing. Resumes a manifest with the same fingerprint; refuses another one."""
        if self.exists() and not overwrite:
            m = self.manifest()
            if m["fingerprint"] != fingerprint:
                raise StoreError(
                    f"stage '{self.name}' in {self.root} was started with another configuration "
                    f"(fingerprint {m['fingerprint'][:12]} != {fingerprint[:12]}); use a new run directory "
                    f"or --overwrite. `prefpipe fingerprint {self.root} {self.name}` shows what went into it.")
            self.remove_orphans(m)
            return m
        if self.dir.exists() and overwrite:
            for p in self.dir.iterdir():
                if p.is_file():
                    p.unlink()
        m = {"format": FORMAT_VERSION, "stage": self.name, "fingerprint": fingerprint,
             "fingerprint_inputs": fingerprint_inputs, "outputs": outputs, "shard_size": shard_size,
             "n_input_rows": n_input_rows, "shards": {}, "complete": False, "summary": None}
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(m)
        return m

    def remove_orphans(self, manifest: dict | None = None) -> int:
        """Delete temp files and shards a killed writer left that the manifest does not list."""
        manifest = manifest or self.manifest()
        listed = {f for s in manifest["shards"].values() for f in s["files"].values()} | {MANIFEST}
        removed = 0
        for p in self.dir.iterdir():
            if p.is_file() and p.name not in listed and (p.suffix in (".parquet", ".tmp")):
                p.unlink()
                removed += 1
        return removed

    def write_shard(self, manifest: dict, index: int, tables: dict[str, pa.Table], *, input_ids: list[str],
                    extra: dict | None = None) -> None:
        files, rows = {}, {}
        for output, table in tables.items():
            name = shard_file(output, index)
            atomic_write_table(self.dir / name, table)
            files[output], rows[output] = name, table.num_rows
        manifest["shards"][str(index)] = {"files": files, "rows": rows, "input_digest": input_digest(input_ids),
                                          "n_inputs": len(input_ids), **(extra or {})}
        self._write_manifest(manifest)

    def finish(self, manifest: dict, summary: dict) -> None:
        manifest["complete"] = True
        manifest["summary"] = summary
        self._write_manifest(manifest)

    # ---- reading --------------------------------------------------------------------------------------
    def files(self, output: str = "main") -> list[Path]:
        m = self.manifest()
        shards = sorted(m["shards"].items(), key=lambda kv: int(kv[0]))
        return [self.dir / s["files"][output] for _, s in shards if output in s["files"]]

    def kind(self, output: str = "main") -> str:
        return self.manifest()["outputs"][output]

    def read(self, output: str = "main", *, columns: list[str] | None = None) -> pa.Table:
        """The whole output as one table in its declared schema (shard order = input order)."""
        kind = self.kind(output)
        files = self.files(output)
        if not files:
            return SCHEMAS[kind].empty_table() if kind in SCHEMAS else pa.table({})
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="default")
        if columns or kind not in SCHEMAS:  # "raw": a table with no declared schema
            return table
        return conform(table, kind, file=str(self.dir))

    def iter_batches(self, output: str = "main", *, batch_size: int = 65536,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the output shard by shard without loading it whole."""
        for f in self.files(output):
            with pq.ParquetFile(f) as pf:  # closing each file keeps a streamed read's memory flat
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def num_rows(self, output: str = "main") -> int:
        return sum(s["rows"].get(output, 0) for s in self.manifest()["shards"].values())


class RunStore:
    """A run directory: one StageStore per stage folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage(self, name: str) -> StageStore:
        if not name or "/" in name or name.startswith("."):
            raise InputError(f"invalid stage name {name!r}")
        return StageStore(self.root, name)

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            raise StoreError(f"run directory {self.root} does not exist")
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).exists())


def cast_to_schema(table: pa.Table, kind: str) -> pa.Table:
    """Cast a table (e.g. from polars, with large_string columns) back to the declared schema of `kind`."""
    return conform(table, kind)
