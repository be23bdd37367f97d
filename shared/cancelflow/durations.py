"""A length of time as people read it: its two largest units ('3 h 5 min', or '3 hours 5 minutes')."""

from __future__ import annotations

_UNITS = ((86_400, "d", "day"), (3_600, "h", "hour"), (60, "min", "minute"))


def text(seconds: float, *, words: bool = False) -> str:
    """'45 min', '3 h 5 min', '4 d 2 h', '30 s'; with `words`: '45 minutes', '1 day 1 hour', '1 second'."""
    rest = int(abs(seconds))
    parts = []
    for size, short, word in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(_unit(count, short, word, words))
    return " ".join(parts[:2]) if parts else _unit(rest, "s", "second", words)


def _unit(count: int, short: str, word: str, words: bool) -> str:
    if not words:
        return f"{count} {short}"
    return f"{count} {word}{'' if count == 1 else 's'}"
