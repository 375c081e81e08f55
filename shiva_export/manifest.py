"""The manifest: the single contract between stages (schema-versioned, hashed, written last, atomically).

Each stage records the hash of its inputs; a later run with the same inputs reuses the stage, and a consumer
(a deployment target, the runtime) verifies the files it received against the recorded sha256s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shiva_export import __version__
from shiva_export.errors import ArtifactError, StaleArtifactError
from shiva_export.io import sha256_file, write_json

SCHEMA = "shiva.manifest/1"
MANIFEST_NAME = "manifest.json"


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
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{path}: unreadable manifest ({err})") from err
        if data.get("schema") != SCHEMA:
            raise ArtifactError(f"{path}: schema {data.get('schema')!r} is not {SCHEMA!r}; re-export with this version")
        return cls(root, data)

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def require(self, name: str) -> dict:
        record = self.stage(name)
        if record is None:
            raise ArtifactError(f"{self.root}: stage {name!r} has not run; run `python -m shiva_export {name} --out {self.root}`")
        return record

    def is_fresh(self, name: str, inputs_hash: str) -> bool:
        """True if the stage ran with these inputs and every file it lists still has its recorded hash."""
        record = self.stage(name)
        if not record or record.get("inputs_hash") != inputs_hash:
            return False
        try:
            self.verify_files(name)
        except ArtifactError:
            return False
        return True

    def set_stage(self, name: str, record: dict[str, Any], inputs_hash: str | None = None) -> None:
        record = dict(record)
        record["inputs_hash"] = inputs_hash
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.data["stages"][name] = record

    def drop_stages(self, *names: str) -> None:
        for name in names:
            self.data["stages"].pop(name, None)

    def file_record(self, path: Path) -> dict:
        return {"path": str(Path(path).relative_to(self.root)), "sha256": sha256_file(path)}

    def verify_files(self, name: str) -> None:
        """Raise StaleArtifactError naming the first file that is missing or changed since the stage recorded it."""
        for entry in self.require(name).get("files", []):
            path = self.root / entry["path"]
            if not path.is_file():
                raise ArtifactError(f"{path}: listed by stage {name!r} in the manifest but missing")
            if sha256_file(path) != entry["sha256"]:
                raise StaleArtifactError(f"{path}: sha256 differs from the manifest (stage {name!r}); it was changed "
                                         f"after export. Re-run `python -m shiva_export {name} --out {self.root}`")

    def save(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return write_json(self.path, self.data)
