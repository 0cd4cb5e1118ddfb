"""Errors of the jobs app that several of its modules raise or catch, kept free of imports from the
app so that any module can use them (jobs.submission, jobs.uploads, jobs.api, jobs.forms, views)."""
from __future__ import annotations


class SubmissionError(ValueError):
    """A submitted job (or uploaded file) that cannot be accepted; ``field`` is the dotted path of the
    offending value (``model``, ``recipe.group_size``, ``calibration.source``, ``file``, ``non_field``)
    and ``message`` says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UploadInUse(Exception):
    """An upload a queued or running job still needs."""
