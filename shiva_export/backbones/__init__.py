"""Backbone adapters, one per DiT family; stages find theirs from a model config (see base.py)."""

from __future__ import annotations

from shiva_export.backbones.base import Backbone, InputSpec, cfg_get
from shiva_export.backbones.flux import Flux
from shiva_export.backbones.pixart import PixArt
from shiva_export.backbones.sd3 import SD3
from shiva_export.errors import ConfigError

REGISTRY: dict[str, Backbone] = {adapter.model_class: adapter for adapter in (SD3(), Flux(), PixArt())}
MODEL_CLASSES = tuple(REGISTRY)
PIPELINE_CLASSES = tuple(adapter.pipeline_class for adapter in REGISTRY.values())
# The model class of a record written before records named it (a router checkpoint's model section without
# `model_class`): the only family there was then.
UNRECORDED_MODEL_CLASS = SD3.model_class

__all__ = ["Backbone", "InputSpec", "MODEL_CLASSES", "PIPELINE_CLASSES", "REGISTRY", "UNRECORDED_MODEL_CLASS",
           "by_class", "for_config", "for_model", "for_pipeline_class"]


def by_class(name, where: str = "model") -> Backbone:
    if name not in REGISTRY:
        raise ConfigError(f"{where}: model class {name!r} is not supported; expected one of {list(MODEL_CLASSES)}")
    return REGISTRY[name]


def for_config(config) -> Backbone:
    """The adapter of a diffusers transformer config (FrozenDict or mapping): its `_class_name`, or for a config
    recorded without it, the family whose identifying keys it has."""
    name = cfg_get(config, "_class_name")
    if name is not None:
        return by_class(name)
    for adapter in REGISTRY.values():
        if any(cfg_get(config, key) is not None for key in adapter.config_keys):
            return adapter
    raise ConfigError(f"model config has no _class_name and no keys of a known family; expected one of "
                      f"{list(MODEL_CLASSES)}")


def for_model(transformer) -> Backbone:
    return by_class(type(transformer).__name__)


def for_pipeline_class(name, where: str) -> Backbone:
    for adapter in REGISTRY.values():
        if adapter.pipeline_class == name:
            return adapter
    raise ConfigError(f"{where}: field _class_name: expected one of {list(PIPELINE_CLASSES)}, got {name!r}")
