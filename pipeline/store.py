"""The run store: a run directory of stage folders holding parquet shards and a manifest (docs/store.md).

    runs/<run>/<stage>/part-00000.parquet   (main output; other outputs as <name>-00000.parquet)
    runs/<run>/<stage>/manifest.json

Every shard is written to a temporary name, fsynced and renamed; the manifest is rewritten the same way after
each shard. A shard counts only once the manifest lists it, so a process killed at any point leaves either the
old manifest (the shard is redone) or the new one (the shard is kept): no row is lost or written twice.

The manifest records each shard file's size and sha256. Reading checks them (a shard deleted, truncated or
edited behind the manifest's back is an error naming the file, never a silently shorter table), and resuming
recomputes such a shard. A manifest is checked against its folder when read: the right JSON shape, and shard
files named exactly as this module names them, so no manifest can point outside its stage folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
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


# Output and stage names become file names: one plain path component each.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


def _is_safe_name(name) -> bool:
    return isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


# sha256 of files already hashed in this process, keyed by what changes when a file does
_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return st.st_size, _DIGESTS[key]


def check_manifest(m, path: Path) -> dict:
    """`m` if it has the shape this module writes; a StoreError naming the manifest and the key otherwise."""
    def bad(msg: str):
        return StoreError(f"corrupt manifest {path}: {msg}")

    def need(obj: dict, key: str, type_, where: str = ""):
        if key not in obj:
            raise bad(f"{where}missing key {key!r}")
        v = obj[key]
        if not isinstance(v, type_) or (type_ is int and isinstance(v, bool)):
            raise bad(f"{where}{key!r} is a {type(v).__name__}, expected a {type_.__name__}")
        return v

    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, expected an object")
    for key, type_ in (("format", int), ("fingerprint", str), ("outputs", dict), ("shard_size", int),
                       ("n_input_rows", int), ("shards", dict), ("complete", bool)):
        need(m, key, type_)
    if m["shard_size"] < 1 or m["n_input_rows"] < 0:
        raise bad(f"shard_size {m['shard_size']} / n_input_rows {m['n_input_rows']} out of range")
    for output, kind in m["outputs"].items():
        if not _is_safe_name(output) or not isinstance(kind, str):
            raise bad(f"output {output!r} is not a plain name (letters, digits, _ . + -)")
    n_shards = -(-m["n_input_rows"] // m["shard_size"])
    for index, shard in m["shards"].items():
        if not (index.isdigit() and str(int(index)) == index and int(index) < n_shards):
            raise bad(f"shard index {index!r} is not one of 0..{n_shards - 1}")
        where = f"shard {index}: "
        if not isinstance(shard, dict):
            raise bad(f"{where}a JSON {type(shard).__name__}, expected an object")
        files, rows = need(shard, "files", dict, where), need(shard, "rows", dict, where)
        need(shard, "input_digest", str, where)
        for output, name in files.items():
            if output not in m["outputs"]:
                raise bad(f"{where}output {output!r} is not declared in 'outputs'")
            if name != shard_file(output, int(index)):  # never a path: nothing outside the stage folder
                raise bad(f"{where}file {name!r} is not {shard_file(output, int(index))!r}")
            need(rows, output, int, f"{where}rows: ")
        for output, c in (shard.get("checksums") or {}).items():
            if not (isinstance(c, dict) and isinstance(c.get("size"), int) and isinstance(c.get("sha256"), str)):
                raise bad(f"{where}checksum of {output!r} is not {{size, sha256}}")
    return m


class StageStore:
    """One stage's folder: its manifest, its shards, and how to read them back."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = Path(root), name
        self.dir = self.root / name
        self.recomputed: dict[str, str] = {}  # shards a resume found damaged and unlisted (begin)

    # ---- manifest -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"no stage '{self.name}' in run directory {self.root} "
                             f"(missing {self.manifest_path})") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise StoreError(f"corrupt manifest {self.manifest_path}: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot read manifest {self.manifest_path}: {e.strerror}") from None
        return check_manifest(m, self.manifest_path)

    def damaged(self, manifest: dict) -> dict[str, str]:
        """Shard index -> what is wrong with one of its files (missing, another size or content)."""
        out = {}
        for index, shard in manifest["shards"].items():
            for output, name in shard["files"].items():
                problem = self._file_problem(self.dir / name, (shard.get("checksums") or {}).get(output))
                if problem:
                    out[index] = f"file {self.dir / name} {problem}"
                    break
        return out

    @staticmethod
    def _file_problem(path: Path, recorded: dict | None) -> str | None:
        if not path.is_file():
            return "is missing"
        if recorded is None:  # a manifest written before checksums were recorded: existence is all we know
            return None
        size, digest = file_digest(path)
        if size != recorded["size"]:
            return f"has {size} bytes, the manifest recorded {recorded['size']} (truncated or replaced)"
        if digest != recorded["sha256"]:
            return "changed since it was written (sha256 differs from the manifest)"
        return None

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
            self._drop_damaged(m)
            self.remove_orphans(m)
            return m
        self.recomputed = {}
        try:
            if self.dir.exists() and overwrite:
                for p in self.dir.iterdir():
                    if p.is_file():
                        p.unlink()
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot write stage folder {self.dir}: {e.strerror}") from None
        m = {"format": FORMAT_VERSION, "stage": self.name, "fingerprint": fingerprint,
             "fingerprint_inputs": fingerprint_inputs, "outputs": outputs, "shard_size": shard_size,
             "n_input_rows": n_input_rows, "shards": {}, "complete": False, "summary": None}
        self._write_manifest(m)
        return m

    def discard(self, *, remove_root: bool = False) -> None:
        """Remove a stage folder this process just began and wrote no shard into (its manifest, temp files),
        and the run directory too when `remove_root` and it is left empty."""
        for p in self.dir.iterdir():
            if p.is_file() and (p.name == MANIFEST or p.suffix == ".tmp"):
                p.unlink()
        for d in [self.dir] + ([self.root] if remove_root else []):
            try:
                d.rmdir()  # only when empty: never deletes what it did not write
            except OSError:
                break

    def _drop_damaged(self, manifest: dict) -> None:
        """Unlist shards whose files are gone or changed, so the resumed run computes them again; said on
        stderr and kept in `self.recomputed` (the engine puts it in the stage summary)."""
        self.recomputed = self.damaged(manifest)
        if not self.recomputed:
            return
        for index, problem in sorted(self.recomputed.items(), key=lambda kv: int(kv[0])):
            print(f"warning: stage '{self.name}': shard {index}: {problem}; computing it again", file=sys.stderr)
            del manifest["shards"][index]
        manifest["complete"] = False
        self._write_manifest(manifest)

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
        files, rows, checksums = {}, {}, {}
        for output, table in tables.items():
            name = shard_file(output, index)
            atomic_write_table(self.dir / name, table)
            size, digest = file_digest(self.dir / name)
            files[output], rows[output], checksums[output] = name, table.num_rows, {"size": size, "sha256": digest}
        manifest["shards"][str(index)] = {"files": files, "rows": rows, "checksums": checksums,
                                          "input_digest": input_digest(input_ids), "n_inputs": len(input_ids),
                                          **(extra or {})}
        self._write_manifest(manifest)

    def finish(self, manifest: dict, summary: dict) -> None:
        manifest["complete"] = True
        manifest["summary"] = summary
        self._write_manifest(manifest)

    # ---- reading --------------------------------------------------------------------------------------
    def files(self, output: str = "main") -> list[Path]:
        """The output's shard files in order, each checked against the size and sha256 the manifest recorded."""
        m = self.manifest()
        shards = sorted(m["shards"].items(), key=lambda kv: int(kv[0]))
        out = []
        for index, s in shards:
            if output not in s["files"]:
                continue
            path = self.dir / s["files"][output]
            problem = self._file_problem(path, (s.get("checksums") or {}).get(output))
            if problem:
                raise StoreError(f"stage '{self.name}' in {self.root}: shard {index}: file {path} {problem}; "
                                 f"rerun the stage to compute it again")
            out.append(path)
        return out

    def kind(self, output: str = "main") -> str:
        outputs = self.manifest()["outputs"]
        if output not in outputs:
            raise StoreError(f"stage '{self.name}' in {self.root} has no output {output!r} (it has {sorted(outputs)})")
        return outputs[output]

    def read(self, output: str = "main", *, columns: list[str] | None = None) -> pa.Table:
        """The whole output as one table in its declared schema (shard order = input order)."""
        kind = self.kind(output)
        files = self.files(output)
        if not files:
            return SCHEMAS[kind].empty_table() if kind in SCHEMAS else pa.table({})
        try:  # permissive: shards may differ in dictionary index width (schemas/validate.py)
            table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files],
                                     promote_options="permissive")
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read stage '{self.name}' in {self.root}: {e}") from None
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
        if not _is_safe_name(name):
            raise InputError(f"invalid stage name {name!r}: one plain name (letters, digits, _ . + -)")
        return StageStore(self.root, name)

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            raise StoreError(f"run directory {self.root} " + ("is a file, not a folder" if self.root.exists()
                                                              else "does not exist"))
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).exists())

    def require_run(self) -> list[str]:
        """The stage names; an error saying so when the folder holds no stage (not a run directory)."""
        names = self.stages()
        if not names:
            hint = (f" (it is itself a stage folder: pass {self.root.parent})" if (self.root / MANIFEST).exists()
                    else "")
            raise StoreError(f"{self.root} is not a run directory: no stage folder with a {MANIFEST} in it{hint}")
        return names

    def check_writable(self) -> None:
        """The run directory is, or can be made, a folder this process can write. Called before any work (a
        model load) starts, so `-o FILE` or a read-only place fails at once; creates nothing (a probe file in
        the nearest existing folder comes and goes)."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError("the run directory is a file, not a folder", file=str(self.root))
        existing = next(p for p in [self.root, *self.root.absolute().parents] if p.exists())
        if not existing.is_dir():
            raise InputError(f"cannot make the run directory: {existing} is a file", file=str(self.root))
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"cannot write the run directory: {e.strerror} ({existing})",
                             file=str(self.root)) from None
