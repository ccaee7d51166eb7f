"""JSON log lines: one valid object per record, fixed keys, extras kept, tracebacks inside."""

from __future__ import annotations

import json
import logging

import pytest

from weavepy.logfmt import JsonFormatter, configure_logging


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    rec = logging.LogRecord("weavepy.agent", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_one_object_with_fixed_keys() -> None:
    line = JsonFormatter().format(record("member %s: %s", "n2", "failed"))
    doc = json.loads(line)
    assert doc["level"] == "warning" and doc["logger"] == "weavepy.agent"
    assert doc["message"] == "member n2: failed"
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert "\n" not in line


def test_extras_tracebacks_and_odd_values_stay_one_line() -> None:
    line = JsonFormatter().format(record("a\nb \"quoted\"", exc=True, peer=object(),
                                         count=3))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == 'a\nb "quoted"' and doc["count"] == 3
    assert "ValueError: boom" in doc["exception"]
    assert doc["peer"].startswith("<object")


def test_configure_logging_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="json"):
        configure_logging("info", "xml")
