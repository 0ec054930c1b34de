"""sdrt's errors: one base class, so an embedding product can catch everything sdrt raises on purpose.

Each subclass also derives from the builtin a caller would expect (ValueError for bad input,
RuntimeError for what went wrong while running), so existing ``except ValueError`` code keeps working.
Library messages name the argument at fault; the CLI maps argument names to its flags.
"""

from __future__ import annotations


class SdrtError(Exception):
    """Base of every error sdrt raises deliberately; the message says what was wrong and what to do."""


class ConfigError(SdrtError, ValueError):
    """An option sdrt does not know or support: a backend or scheduler name, a scheduler setting."""


class GenerationError(SdrtError, ValueError):
    """Bad input to a generation call; the message says what was wrong and what to do."""


class NonFiniteError(SdrtError, RuntimeError):
    """NaN or Inf came out of an engine: no image is produced from it."""


class ModelDirError(SdrtError, ValueError):
    """A model directory that is missing, incomplete or written by a newer sdrt."""


class BackendUnavailable(SdrtError, RuntimeError):
    """The requested backend cannot run here (package or device missing); the message says what to install."""


class EngineMismatch(SdrtError, RuntimeError):
    """An engine recorded in the manifest that cannot run here; the message says why and how to rebuild."""


class ShapeOutsideProfile(SdrtError, ValueError):
    """A call whose shapes the engine's optimization profile does not cover."""
