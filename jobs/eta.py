"""Time left for a running job, from measured rates, never from the job-wide bar alone.

The progress bar's stages have fixed shares (compression.progress.STAGES) that are nothing like
their real durations, so "elapsed x (1 - fraction) / fraction" is wrong in both directions. Instead:

* the current stage: its own measured rate, ``elapsed_in_stage x (1 - within) / within``, where
  ``within`` is how far the stage is (layers done for compression, lm-eval requests done for an
  evaluation), once it has measurably started (>= 2 %); before that, an earlier run's duration;
* every stage still to come: how long it took in the owner's last succeeded job with the same
  model, recipe and evaluation (results["timings"]); the compressed evaluation, lacking that,
  takes as long as this job's own baseline evaluation did (same tasks, same documents); the
  finish (model card, rename) counts as nothing.

When some stage still to come has no measurement the total is unknown and is shown as such; the
current stage's estimate stands alone.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

STAGE_ORDER = ("load", "baseline", "calibration", "compress", "export", "evaluate", "finish")
# results["timings"] keys that make up each progress stage
STAGE_TIMING_KEYS = {
    "load": ("load_s",), "baseline": ("baseline_eval_s", "baseline_speed_s"), "calibration": ("calibration_s",),
    "compress": ("compress_s",), "export": ("export_s",),
    "evaluate": ("compressed_load_s", "compressed_eval_s", "compressed_speed_s"), "finish": ("card_s",),
}
MIN_WITHIN = 0.02


def stage_durations(timings: dict | None) -> dict[str, float]:
    """Seconds per progress stage from a finished job's results["timings"]."""
    out: dict[str, float] = {}
    for stage, keys in STAGE_TIMING_KEYS.items():
        values = [timings[k] for k in keys if isinstance((timings or {}).get(k), (int, float))]
        if values:
            out[stage] = float(sum(values))
    return out


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def estimate(progress: dict, now: dt.datetime, *, previous: dict[str, float] | None = None,
             needs_calibration: bool = True) -> dict | None:
    """``{"stage_s": float | None, "total_s": float | None}`` for a running job's ``progress`` dict
    (as `jobs.tasks.ProgressRecorder` stores it), or None when nothing can be said yet."""
    stage = progress.get("stage")
    if stage not in STAGE_ORDER:
        return None
    previous = previous or {}
    measured = {k: float(v) for k, v in (progress.get("stage_seconds") or {}).items()
                if isinstance(v, (int, float))}
    started = _parse_time(progress.get("stage_started_at"))
    elapsed = (now - started).total_seconds() if started else None
    within = progress.get("within")
    stage_left = None
    if elapsed is not None and isinstance(within, (int, float)) and MIN_WITHIN <= within < 1:
        stage_left = elapsed * (1 - within) / within
    elif elapsed is not None and stage in previous:
        stage_left = max(previous[stage] - elapsed, 0.0)
    if stage_left is None:
        return None
    total: float | None = stage_left
    for later in STAGE_ORDER[STAGE_ORDER.index(stage) + 1:]:
        if later == "calibration" and not needs_calibration:
            continue
        guess = previous.get(later)
        if guess is None and later == "evaluate":
            guess = measured.get("baseline")
        if guess is None and later == "finish":
            guess = 0.0  # writing the card and renaming the directory: seconds at most
        if guess is None:
            total = None
            break
        total += guess
    return {"stage_s": round(stage_left), "total_s": round(total) if total is not None else None}


def human(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 90:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
