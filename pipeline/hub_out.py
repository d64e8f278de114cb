"""Where an export lands: the `--out` folder rules and the paths read from a run's manifests.

An export never deletes what it did not write. It keeps a listing of its own files (LISTING, a hidden JSON
file `datasets` does not read) in the folder; a later export into a non-empty folder needs `overwrite`, and even
then removes only the files that listing names. Anything else there (a `.git` of a cloned dataset repo, the
user's notes) stays. A folder without a listing is never overwritten.

Paths that come from a manifest (output names, shard files) are data, not trusted: an output name must be one
plain path component, and a shard file must sit inside its stage folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipeline.errors import InputError

LISTING = ".prefpipe-export.json"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str, what: str, file: str | None = None) -> str:
    """`name` as one path component (no separators, no `..`, no leading dot), else an input error."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise InputError(f"{what} {name!r} is not a plain name (letters, digits, . _ -; no path separators or "
                         "'..')", file=file)
    return name


def inside(base: Path, path: Path, what: str, file: str | None = None) -> Path:
    """`path` when it resolves inside `base`; an absolute or escaping path is an input error."""
    if path.is_absolute():
        raise InputError(f"{what} {str(path)!r} is an absolute path (expected one relative to {base})", file=file)
    if not (base / path).resolve().is_relative_to(base.resolve()):
        raise InputError(f"{what} {str(path)!r} escapes {base}", file=file)
    return base / path


def _listed(out: Path) -> list[str]:
    """The relative file paths an earlier export wrote here (checked: each stays inside `out`)."""
    path = out / LISTING
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"export listing is unreadable ({e}); remove the folder's files by hand or choose "
                         "another --out", file=str(path)) from None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InputError("export listing: `files` is not a list of paths", file=str(path))
    for f in files:
        if Path(f).is_absolute() or Path(f).parts[:1] == (".git",):
            raise InputError(f"export listing names {f!r}, which an export never writes", file=str(path))
        inside(out, Path(f), "export listing entry", str(path))
    return files


def check_out(out: Path, overwrite: bool) -> list[str]:
    """Before anything is built: the files of an earlier export to replace (empty for a new or empty folder)."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise InputError("export target exists and is not a folder", file=str(out))
    if not any(out.iterdir()):
        return []
    if not (out / LISTING).exists():
        raise InputError(f"export folder is not empty and holds no earlier export (no {LISTING}); nothing in it "
                         "is touched: choose another --out", file=str(out))
    if not overwrite:
        raise InputError("export folder holds an earlier export; pass --overwrite to replace it (only the files "
                         f"its {LISTING} lists are removed)", file=str(out))
    return _listed(out)


def write_listing(folder: Path, files: list[str], configs: dict[str, dict]) -> None:
    """The listing of everything this export wrote, and each config's format (read by `prefpipe train`)."""
    body = {"files": sorted(files), "configs": configs}
    (folder / LISTING).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def install(built: Path, out: Path, old_files: list[str]) -> None:
    """Move a finished build (a sibling temp folder) to `out`: a rename when `out` is new, else remove the old
    export's listed files (and folders they leave empty), then move the new files in, the listing last."""
    if not out.exists():
        os.replace(built, out)
        return
    for rel in old_files:
        p = out / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
        for parent in p.parents:  # data/<config>/ folders the old export left empty
            if parent == out or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
    new = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    for rel in sorted(new, key=lambda r: str(r) == LISTING):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(built / rel, out / rel)
    shutil.rmtree(built, ignore_errors=True)
