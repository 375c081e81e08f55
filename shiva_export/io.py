"""Atomic artifact writes and content hashes: artifacts appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside `dest`; it replaces `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        yield tmp
        _install(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory beside `dest`; it replaces `dest` as a whole on success.

    The old directory (if any) is kept until the new one is complete, then swapped out.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _install(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, dest: Path) -> None:
    """Move a finished `tmp` over `dest`: journaled inside an open stage transaction (`artifact.Transaction`),
    else directly (a folder is swapped out whole and the old one removed)."""
    from shiva_export.artifact import active_transaction

    txn = active_transaction(dest)
    if txn is not None:
        txn.replace(tmp, dest)
    elif dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def write_json(dest: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (sorted keys, trailing newline) and return the path."""
    dest = Path(dest)
    with atomic_output(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dest


def write_json_direct(dest: Path, data: Any) -> None:
    """Atomic JSON write outside any stage transaction (the transaction's own journal)."""
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    dest = Path(dest)
    with atomic_output(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
