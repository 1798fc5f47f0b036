"""Exceptions raised by hf_prune. Each message names the parameter and what is allowed."""

from __future__ import annotations


class HfPruneError(Exception):
    """Base class for every hf_prune error."""


class ConfigError(HfPruneError, ValueError):
    """A `PruningConfig` field (or a CLI flag) has a value that is not allowed."""


class CalibrationError(HfPruneError, ValueError):
    """Calibration data is missing, empty, too short or of an unsupported type."""


class UnsupportedModelError(HfPruneError, ValueError):
    """The model's decoder blocks or prunable layers cannot be found, or a shape does not fit."""


class NumericalError(HfPruneError, RuntimeError):
    """NaN/Inf activations or a factorisation that failed even after the documented fallbacks."""


class IncompletePruningError(HfPruneError, RuntimeError):
    """The model was left partially pruned by a failed run and must not be saved or used as pruned."""
