"""Schemas for the JSON files we read back from folders we do not control (manifests, schedules, sidecars, configs).

A schema is a tree of small specs (`Int`, `Float`, `Str`, `Obj`, ...). `validate(data, spec, source)` walks the
data once and raises one error naming the file, the field (as a dotted path, e.g. `stages.export.graphs[0].k`)
and what was expected, so a forged or damaged file ends in one clear line, never in a `KeyError` deep inside a
stage. Specs only check shape, types and ranges; cross-field consistency stays with the code that owns it.

Example:
    CONFIG = Obj({"steps": Int(minimum=1), "dtype": Str(choices=("fp32", "fp16"))}, optional={"router": Str()})
    validate(json.loads(text), CONFIG, "run/config.json", error=ConfigError)
"""

from __future__ import annotations

__all__ = ["Any_", "Bool", "Float", "Hex", "Int", "ListOf", "MapOf", "Nullable", "Obj", "RelPath", "Str", "validate"]

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping

from shiva_export.errors import ArtifactError, ShivaError


class _Invalid(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where, self.message = where, message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Spec:
    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, where: str) -> None:
        raise NotImplementedError

    def fail(self, value: Any, where: str, expected: str | None = None) -> None:
        raise _Invalid(where, f"expected {expected or self.describe()}, got {_show(value)}")


@dataclass(frozen=True)
class Any_(Spec):
    """Anything JSON (a record's free-form part, e.g. a report)."""

    def describe(self) -> str:
        return "any value"

    def check(self, value: Any, where: str) -> None:
        return None


@dataclass(frozen=True)
class Bool(Spec):
    def describe(self) -> str:
        return "true or false"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, bool):
            self.fail(value, where)


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


@dataclass(frozen=True)
class Int(Spec):
    minimum: int | None = None
    maximum: int | None = None

    def describe(self) -> str:
        return "an integer" + _range(self.minimum, self.maximum)

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(value, where)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            self.fail(value, where)


@dataclass(frozen=True)
class Float(Spec):
    """A finite number (ints accepted); `exclusive_minimum` for ranges such as (0, 1]."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def describe(self) -> str:
        if self.exclusive_minimum and self.minimum is not None:
            upper = f", {self.maximum}]" if self.maximum is not None else ", inf)"
            return f"a finite number in ({self.minimum}{upper}"
        return "a finite number" + _range(self.minimum, self.maximum)

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(value, where)
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            self.fail(value, where)
        if self.maximum is not None and value > self.maximum:
            self.fail(value, where)


@dataclass(frozen=True)
class Str(Spec):
    choices: tuple[str, ...] | None = None
    max_length: int = 4096

    def describe(self) -> str:
        return f"one of {list(self.choices)}" if self.choices else "a string"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str) or len(value) > self.max_length:
            self.fail(value, where)
        if self.choices is not None and value not in self.choices:
            self.fail(value, where)


_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Hex(Spec):
    """A lowercase hex digest (sha256: 64 characters)."""

    length: int = 64

    def describe(self) -> str:
        return f"a {self.length}-character hex digest"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str) or len(value) != self.length or not _HEX.match(value):
            self.fail(value, where)


@dataclass(frozen=True)
class RelPath(Spec):
    """A relative POSIX path that stays inside its folder: no absolute path, no `..`, no empty or odd parts.

    This is the lexical half of keeping a folder's references inside it; `artifact.inside` adds the symlink half
    when the path is used.
    """

    def describe(self) -> str:
        return "a relative path inside the folder (no '..', not absolute)"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str) or not value or len(value) > 1024 or "\\" in value or "\x00" in value:
            self.fail(value, where)
        path = PurePosixPath(value)
        if path.is_absolute() or any(part in ("..", "") for part in path.parts) or value.startswith("~"):
            self.fail(value, where)


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.inner.check(value, where)


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    min_length: int = 0
    max_length: int | None = None

    def describe(self) -> str:
        size = f" of {self.min_length}+" if self.min_length else ""
        return f"a list{size} of {self.item.describe()}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) < self.min_length or (
                self.max_length is not None and len(value) > self.max_length):
            self.fail(value, where)
        for index, item in enumerate(value):
            self.item.check(item, f"{where}[{index}]")


@dataclass(frozen=True)
class MapOf(Spec):
    """A JSON object with free keys (matching `keys`) whose values all follow one spec."""

    value: Spec
    keys: Spec = Str()

    def describe(self) -> str:
        return f"an object of {self.value.describe()}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, where)
        for key, item in value.items():
            self.keys.check(key, f"{where} key {_show(key)}")
            self.value.check(item, f"{where}.{key}")


@dataclass(frozen=True)
class Obj(Spec):
    """A JSON object: `required` keys must be present, `optional` ones may be; other keys are refused unless
    `extra` (records that later versions may extend)."""

    required: Mapping[str, Spec] = field(default_factory=dict)
    optional: Mapping[str, Spec] = field(default_factory=dict)
    extra: bool = False

    def describe(self) -> str:
        return "an object"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, where)
        for key, spec in self.required.items():
            if key not in value:
                raise _Invalid(_join(where, key), f"missing; expected {spec.describe()}")
            spec.check(value[key], _join(where, key))
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], _join(where, key))
        if not self.extra:
            unknown = sorted(str(k) for k in value if k not in self.required and k not in self.optional)
            if unknown:
                known = sorted([*self.required, *self.optional])
                raise _Invalid(_join(where, unknown[0]), f"unknown key; expected only {known}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def validate(data: Any, spec: Spec, source: str, error: type[ShivaError] = ArtifactError) -> Any:
    """Return `data` if it follows `spec`; else raise `error`: "<source>: field <path>: <what was expected>"."""
    try:
        spec.check(data, "")
    except _Invalid as invalid:
        field_name = f"field {invalid.where}" if invalid.where else "content"
        raise error(f"{source}: {field_name}: {invalid.message}") from None
    except RecursionError:
        raise error(f"{source}: content is nested too deeply") from None
    return data
