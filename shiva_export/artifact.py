"""An artifact folder as untrusted, shared state: paths kept inside it, one writer at a time, all-or-nothing stages.

* `inside(root, relative)`: the one way a name read from the folder becomes a path. Absolute names, `..` and
  symlinks that leave the folder are refused before anything is opened.
* `FolderLock`: one advisory lock per folder (`.shiva.lock`, `flock`). Writers hold it exclusively for as long as
  their `Workspace` lives; readers (`inspect`, the runtime) take it shared while they verify. A second writer is
  refused with "in use by PID n" instead of racing the first.
* `Transaction`: a stage's file replacements and its manifest update as one unit. While a transaction is open,
  `io.atomic_output` / `io.atomic_directory` keep what they replace as a backup and list it in a journal
  (`.shiva-journal.json`, written before each move); `Manifest.save()` is the commit point that drops the
  backups. An exception (Ctrl-C included) rolls the moves back in-process; after a SIGKILL the next process that
  takes the lock finds the journal and rolls back (or, if the manifest was already committed, finishes).
* `sweep(root)`: removes partial files and folders (`.X.partial-<pid>`, `.X.old-<pid>`) left by dead processes.
"""

from __future__ import annotations

__all__ = ["FolderLock", "Transaction", "active_transaction", "inside", "recover", "recover_needed", "sweep"]

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import weakref
from pathlib import Path, PurePosixPath

from shiva_export.errors import ArtifactError
from shiva_export.records import MANIFEST_NAME

log = logging.getLogger(__name__)

LOCK_NAME = ".shiva.lock"
JOURNAL_NAME = ".shiva-journal.json"
_LEFTOVER = re.compile(r"^\..+\.(partial|old)-(\d+)(-\d+)?$|^\.write-probe-(\d+)$")


def inside(root: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """`root / relative`, refused with ArtifactError unless it stays inside `root` (symlinks resolved)."""
    root = Path(root)
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
        raise ArtifactError(f"{root}: {what} {relative!r} is not a relative path inside the folder")
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts or relative.startswith("~"):
        raise ArtifactError(f"{root}: {what} {relative!r} leads outside the folder; expected a relative path "
                            "without '..'")
    path = root / relative
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise ArtifactError(f"{root}: {what} {relative!r} is a symlink that leads outside the folder (to {target})")
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class FolderLock:
    """Advisory per-folder lock, shared by every `Workspace` of this process on that folder (reference counted)."""

    _held: dict[Path, "FolderLock"] = {}

    def __init__(self, root: Path, fd: int, exclusive: bool):
        self.root, self.fd, self.exclusive, self.users = root, fd, exclusive, 0

    @classmethod
    def acquire(cls, root: str | os.PathLike, exclusive: bool, owner: object | None = None) -> "FolderLock | None":
        """Take the folder's lock (or reuse this process's); None for a read on a folder where no lock can be made.

        With `owner`, the lock is released when `owner` is garbage collected.
        """
        root = Path(root)
        key = root.resolve()
        lock = cls._held.get(key)
        if lock is None:
            try:
                fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                if exclusive:
                    raise ArtifactError(f"{root}: cannot create {LOCK_NAME} ({err.strerror})") from err
                try:
                    fd = os.open(root / LOCK_NAME, os.O_RDONLY)
                except OSError:
                    return None  # a read-only copy without a lock file: nobody can be writing it
            lock = cls(key, fd, False)
            try:
                lock._flock(exclusive)
            except BaseException:
                os.close(fd)
                raise
            cls._held[key] = lock
        elif exclusive and not lock.exclusive:
            lock._flock(True)
        lock.users += 1
        if owner is not None:
            weakref.finalize(owner, lock.release)
        return lock

    def _flock(self, exclusive: bool) -> None:
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._holder()
            raise ArtifactError(f"{self.root}: folder in use by PID {holder or '?'} (another shiva_export process is "
                                "writing it); wait for it to finish or stop it") from None
        if exclusive:
            self.exclusive = True

    def _holder(self) -> int | None:
        """The PID holding the lock, from the kernel's table (/proc/locks); the lock file itself stays empty, so
        a folder's bytes do not change with who wrote it last."""
        try:
            inode = os.fstat(self.fd).st_ino
            with open("/proc/locks") as table:
                for line in table:
                    fields = line.split()
                    if "->" in fields:
                        fields.remove("->")
                    if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                        pid = int(fields[4])
                        if pid != os.getpid():
                            return pid
        except (OSError, ValueError):
            return None
        return None

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if FolderLock._held.get(self.root) is self:
            del FolderLock._held[self.root]
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing the descriptor releases the flock


class Transaction:
    """A stage's replacements inside one folder, undone unless `commit()` (the manifest's save) is reached."""

    _open: list["Transaction"] = []

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.base = self.root.resolve()
        self.entries: list[dict] = []
        self.count = 0

    def covers(self, dest: Path) -> bool:
        """True for a destination in this folder, except inside a partial folder (it is replaced as a whole)."""
        parent = dest.parent.resolve()
        if parent != self.base and self.base not in parent.parents:
            return False
        return not any(_LEFTOVER.match(part) for part in parent.relative_to(self.base).parts)

    def replace(self, tmp: Path, dest: Path) -> None:
        """Move `tmp` over `dest`, keeping the old `dest` as a journaled backup until commit."""
        backup = None
        if dest.exists() or dest.is_symlink():
            self.count += 1
            backup = dest.with_name(f".{dest.name}.old-{os.getpid()}-{self.count}")
        self.entries.append({"dest": os.path.relpath(dest.resolve(), self.base),
                             "backup": None if backup is None else os.path.relpath(backup.resolve(), self.base)})
        self._write_journal()
        if backup is not None:
            os.replace(dest, backup)
        os.replace(tmp, dest)

    def _write_journal(self) -> None:
        from shiva_export.io import write_json_direct

        manifest = self.root / MANIFEST_NAME
        write_json_direct(self.root / JOURNAL_NAME, {"pid": os.getpid(), "entries": self.entries,
                                                     "manifest_sha256": _sha256_or_none(manifest)})

    def commit(self) -> None:
        """The manifest now describes the new files: drop the backups and the journal."""
        for entry in self.entries:
            if entry["backup"]:
                _remove(self.base / entry["backup"])
        self.entries = []
        with contextlib.suppress(FileNotFoundError):
            (self.root / JOURNAL_NAME).unlink()

    def rollback(self) -> None:
        _undo(self.base, self.entries)
        self.entries = []
        with contextlib.suppress(FileNotFoundError):
            (self.root / JOURNAL_NAME).unlink()

    def __enter__(self) -> "Transaction":
        Transaction._open.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        Transaction._open.remove(self)
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def active_transaction(dest: Path) -> Transaction | None:
    """The innermost open transaction whose folder holds `dest`."""
    for txn in reversed(Transaction._open):
        if txn.covers(dest):
            return txn
    return None


def _sha256_or_none(path: Path) -> str | None:
    from shiva_export.io import sha256_file

    return sha256_file(path) if path.is_file() else None


def _undo(base: Path, entries: list[dict]) -> None:
    for entry in reversed(entries):
        dest = base / entry["dest"]
        _remove(dest)
        if entry.get("backup") and (base / entry["backup"]).exists():
            os.replace(base / entry["backup"], dest)


def recover_needed(root: str | os.PathLike) -> bool:
    """Whether a write journal is waiting in the folder (a writer died, or this process is inside a stage)."""
    return (Path(root) / JOURNAL_NAME).exists()


def recover(root: str | os.PathLike) -> str | None:
    """Finish what a killed writer left: roll back its uncommitted stage, or drop a committed one's backups.

    Call with the folder's lock held. Returns what was done, or None if there was no journal.
    """
    root = Path(root)
    journal = root / JOURNAL_NAME
    if not journal.is_file():
        return None
    base = root.resolve()
    try:
        data = json.loads(journal.read_text())
        pid, entries, manifest_sha = int(data["pid"]), list(data["entries"]), data.get("manifest_sha256")
        for entry in entries:  # the journal is untrusted too: every name must stay in the folder
            inside(root, entry["dest"], "journal entry")
            if entry.get("backup"):
                inside(root, entry["backup"], "journal entry")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{journal}: unreadable write journal ({err}); remove it by hand after checking the "
                            "folder with `python -m shiva_export inspect`") from None
    if pid == os.getpid() and Transaction._open:
        return None  # this process's own stage is still writing
    if pid != os.getpid() and _pid_alive(pid):
        raise ArtifactError(f"{root}: folder in use by PID {pid} (its stage has not finished)")
    committed = _sha256_or_none(root / MANIFEST_NAME) != manifest_sha
    if committed:
        for entry in entries:
            if entry.get("backup"):
                _remove(base / entry["backup"])
        action = f"finished the stage PID {pid} had committed"
    else:
        _undo(base, entries)
        action = f"rolled back the stage PID {pid} was writing when it stopped"
    journal.unlink()
    log.warning("%s: %s", root, action)
    return action


def sweep(root: str | os.PathLike) -> list[Path]:
    """Remove partial files/folders that dead processes left anywhere in the folder; returns what was removed."""
    root = Path(root)
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            match = _LEFTOVER.match(name)
            if not match:
                continue
            pid = int(match.group(2) or match.group(4))
            if pid == os.getpid() or _pid_alive(pid):
                continue
            path = Path(dirpath) / name
            _remove(path)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not _LEFTOVER.match(d)]
    if removed:
        log.info("%s: removed %d partial file(s) of stopped processes", root, len(removed))
    return removed
