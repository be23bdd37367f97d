"""cancelflow.durations: one way to say how long, short (status history, dispute reasons) or in words
(emails)."""

from __future__ import annotations

from cancelflow.durations import text


def test_short() -> None:
    assert [text(s) for s in (0, 30, 720, 2700, 7200, 11_100, 360_540)] == [
        "0 s", "30 s", "12 min", "45 min", "2 h", "3 h 5 min", "4 d 4 h"]


def test_in_words() -> None:
    assert [text(s, words=True) for s in (0, 1, 59, 60, 2700, 3600, 7500, 90_000, 200_000)] == [
        "0 seconds", "1 second", "59 seconds", "1 minute", "45 minutes", "1 hour", "2 hours 5 minutes",
        "1 day 1 hour", "2 days 7 hours"]


def test_a_negative_length_reads_as_its_size() -> None:
    assert text(-5400) == "1 h 30 min"
