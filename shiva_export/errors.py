"""Errors a user can act on. The CLI prints a ShivaError without a traceback (exit 2)."""


class ShivaError(Exception):
    """Failure caused by input, environment or stale artifacts, not by a bug in shiva_export."""


class ConfigError(ShivaError):
    """An option, preset or checkpoint does not fit the model or the method."""


class ArtifactError(ShivaError):
    """A file or folder is missing, unreadable or not what the stage expects."""


class StaleArtifactError(ArtifactError):
    """An artifact was produced from different inputs than the ones now given."""


class BackendUnavailableError(ShivaError):
    """An optional runtime (TensorRT, TensorRT-RTX, a GPU) is not importable or usable here."""


class StaticGraphError(ShivaError):
    """An ONNX graph is not fully static or not legal for TensorRT."""


class InputError(ShivaError):
    """A tensor handed to a runner has the wrong name, shape or dtype."""


class NonFiniteError(ShivaError):
    """A model or engine returned NaN or Inf (inputs checked finite); the artifact or runtime computes wrongly."""
