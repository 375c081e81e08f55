"""The manifest: the single contract between stages (schema-versioned, hashed, written last, atomically).

Each stage records the hash of its inputs; a later run with the same inputs reuses the stage, and a consumer
(a deployment target, the runtime) verifies the files it received against the recorded sha256s. Stages write and
read their records typed (`records`): `manifest.set_stage(ExportRecord(...), inputs_hash)`,
`manifest.require(ExportRecord).graphs`, and `manifest.config` (an `ArtifactConfig`); `data` is the JSON on disk.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from shiva_export import __version__
from shiva_export.artifact import Transaction, active_transaction, inside
from shiva_export.errors import ArtifactError, StaleArtifactError
from shiva_export.io import sha256_file, write_json_direct
from shiva_export.records import (MANIFEST_NAME, STAGE_RECORDS, ArtifactConfig, FileRecord, R, StageRecord,
                                  record_type)
from shiva_export.schema import Obj, Str, validate

SCHEMA = "shiva.manifest/1"
# Written into every exported graph's metadata_props, so a graph file carries which bucket it is: a record that
# points bucket 0 at another graph (dense.onnx, another bucket) is refused even when its sha256 was edited to match.
GRAPH_BUCKET_KEY = "shiva.bucket"   # "0", "1", ... or "dense"
GRAPH_K_KEY = "shiva.k"             # the k-vector as JSON, "null" for dense
MAX_MANIFEST_BYTES = 64 << 20

# What a manifest may hold: `config` is `records.ArtifactConfig.SPEC` exactly; each stage's record follows its
# class's SPEC (`records`: the keys the stages and the runtime read are required, with their types and ranges; records may carry
# more keys than listed, as later versions add some).
MANIFEST_SPEC = Obj({"schema": Str(), "tool_version": Str(),
                     "stages": Obj(optional={name: record.SPEC for name, record in STAGE_RECORDS.items()})},
                    {"config": ArtifactConfig.SPEC})


class Manifest:
    """An artifact folder's manifest: {schema, tool_version, stages: {name: record}}."""

    def __init__(self, root: str | Path, data: dict | None = None):
        self.root = Path(root)
        self.data = data or {"schema": SCHEMA, "tool_version": __version__, "stages": {}}

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def load(cls, root: str | Path, must_exist: bool = True) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            if must_exist:
                raise ArtifactError(f"{root}: no {MANIFEST_NAME}; run `python -m shiva_export export --out {root}` first")
            return cls(root)
        inside(root, MANIFEST_NAME, "manifest")
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"{path}: {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{path}: unreadable manifest ({err})") from None
        if isinstance(data, dict) and data.get("schema") != SCHEMA:
            raise ArtifactError(f"{path}: field schema: {data.get('schema')!r} is not {SCHEMA!r}; re-export with "
                                "this version")
        validate(data, MANIFEST_SPEC, str(path))
        return cls(root, data)

    @property
    def config(self) -> ArtifactConfig | None:
        """What the folder is built from (the options every stage resolved), or None before the first stage."""
        data = self.data.get("config")
        return None if data is None else ArtifactConfig.from_json(data)

    @config.setter
    def config(self, config: ArtifactConfig) -> None:
        self.data["config"] = config.to_json()

    def record(self, kind: type[R] | str) -> R | None:
        """The typed record of a stage (its class, e.g. `ExportRecord`, or its name), or None if it has not run."""
        kind = record_type(kind)
        data = self.data["stages"].get(kind.STAGE)
        return None if data is None else kind.from_json(data)

    def require(self, kind: type[R] | str) -> R:
        """The typed record of a stage that must have run (ArtifactError naming the command to run, if not)."""
        record = self.record(kind)
        if record is None:
            name = record_type(kind).STAGE
            raise ArtifactError(f"{self.root}: stage {name!r} has not run; run `python -m shiva_export {name} --out {self.root}`")
        return record

    def is_fresh(self, kind: type[R] | str, inputs_hash: str) -> bool:
        """True if the stage ran with these inputs and every file it lists still has its recorded hash."""
        record = self.record(kind)
        if record is None or record.inputs_hash != inputs_hash:
            return False
        try:
            self.verify_files(kind)
        except ArtifactError:
            return False
        return True

    def set_stage(self, record: R, inputs_hash: str | None = None) -> R:
        """Record a stage (its name is the record's `STAGE`), stamped with its inputs' hash and the time now."""
        record = dataclasses.replace(record, inputs_hash=inputs_hash,
                                     finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.data["stages"][record.STAGE] = record.to_json()
        return record

    def drop_stages(self, *names: str) -> None:
        for name in names:
            self.data["stages"].pop(name, None)

    def file_record(self, path: Path) -> FileRecord:
        """The record of a file inside the folder, hashed now."""
        return FileRecord(path=Path(path).relative_to(self.root).as_posix(), sha256=sha256_file(path))

    def path_of(self, relative: str, what: str = "file") -> Path:
        """A path the manifest names, refused unless it stays inside the folder (`artifact.inside`)."""
        return inside(self.root, relative, what)

    def recorded_sha256(self, relative: str) -> str | None:
        """The sha256 some stage recorded for `relative` (a path inside the folder), or None."""
        for name in self.data["stages"]:
            for entry in self.record(name).files:
                if entry.path == relative:
                    return entry.sha256
        return None

    def verify_file(self, relative: str, sha256: str | None, stage: str) -> Path:
        """Resolve `relative` inside the folder and check it against `sha256`; returns the path."""
        path = self.path_of(relative, f"file of stage {stage!r}")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed by stage {stage!r} in the manifest but missing")
        if sha256_file(path) != sha256:
            raise StaleArtifactError(f"{path}: sha256 differs from the manifest (stage {stage!r}); it was changed "
                                     f"after the stage wrote it. Re-run `python -m shiva_export {stage} --out "
                                     f"{self.root}`")
        return path

    def verify_files(self, kind: type[StageRecord] | str) -> None:
        """Raise StaleArtifactError naming the first file that is missing or changed since the stage recorded it.

        Every path is resolved inside the folder first: a name that leads outside is refused unopened."""
        record = self.require(kind)
        for entry in record.files:
            self.path_of(entry.path, f"file of stage {record.STAGE!r}")
        for entry in record.files:
            self.verify_file(entry.path, entry.sha256, record.STAGE)

    def writing(self) -> Transaction:
        """`with manifest.writing():` a stage's file replacements and its `save()` as one transaction."""
        return Transaction(self.root)

    def save(self) -> Path:
        """Write the manifest atomically; inside `writing()`, this is the stage's commit point."""
        self.root.mkdir(parents=True, exist_ok=True)
        validate(self.data, MANIFEST_SPEC, f"{self.path} (about to be written)")
        write_json_direct(self.path, self.data)
        txn = active_transaction(self.path)
        if txn is not None:
            txn.commit()
        return self.path
