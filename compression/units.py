"""One way to print sizes for the page, the API's readers and the model card: decimal units
(1 MB = 10^6 bytes, 1 GB = 10^9 bytes), as the Hugging Face Hub shows file sizes."""
from __future__ import annotations

MB = 10 ** 6
GB = 10 ** 9


def format_bytes(n: int | float) -> str:
    """``269.1 MB``, ``1.42 GB``, ``512 B``."""
    if n >= GB:
        return f"{n / GB:.2f} GB"
    if n >= MB / 10:
        return f"{n / MB:.1f} MB"
    if n >= 1000:
        return f"{n / 1000:.1f} kB"
    return f"{int(n)} B"


def smaller_pct(compressed: int | float, dense: int | float) -> float | None:
    """How much smaller ``compressed`` is than ``dense``, in percent (None if undefined)."""
    return (1 - compressed / dense) * 100 if dense and compressed else None
