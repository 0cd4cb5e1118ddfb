"""Template filters that print numbers the way the model card does (one unit everywhere)."""
from __future__ import annotations

from django import template

from compression.units import format_bytes

register = template.Library()


@register.filter(name="bytes")
def bytes_filter(value) -> str:
    """Decimal megabytes/gigabytes (1 MB = 10^6 bytes), as in the model card; "—" when unknown."""
    try:
        return format_bytes(int(value))
    except (TypeError, ValueError):
        return "—"
