"""Exceptions the engine raises; kept free of heavy imports so the UI can import them cheaply."""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe (or a recipe/model combination) that cannot be run.

    ``field`` is a dotted path to the offending value (``stages[0].modifiers[1].group_size``,
    ``recipe.group_size`` or a form field name); ``message`` says what is allowed instead.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class JobCancelled(Exception):
    """Raised between decoder layers when ``should_stop()`` returned true."""


class UnsupportedModelError(ValueError):
    """The model's structure cannot be walked one decoder layer at a time."""


class SparsityPatternError(RuntimeError):
    """A 2:4 weight lost its pattern after a compression stage (a bug, never silently ignored)."""


class CalibrationError(RecipeError):
    """Calibration data could not be found, read or tokenized (field defaults to calibration.source)."""

    def __init__(self, message: str, field: str = "calibration.source"):
        super().__init__(field, message)
