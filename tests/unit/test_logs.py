"""Secrets never reach a log line."""

from __future__ import annotations

import io
import json

import structlog

from daemon import logs
from daemon.tokens import generate


def test_json_lines_mask_secret_fields_and_token_text() -> None:
    buf = io.StringIO()
    logs.configure("json", "debug", stream=buf)
    tok = str(generate())
    log = structlog.get_logger("t")
    log.info("demo.event", token=tok, password="hunter2", note=f"user pasted {tok} here",
             nested={"bind_password": "x", "list": [tok]}, token_id="abc")
    line = buf.getvalue().strip()
    assert tok not in line and "hunter2" not in line
    data = json.loads(line)
    assert data["event"] == "demo.event" and data["token_id"] == "abc"
    assert data["token"] == "***" and data["password"] == "***"
    assert data["note"].startswith("user pasted gg_")


def test_console_format_also_masks() -> None:
    buf = io.StringIO()
    logs.configure("console", "info", stream=buf)
    tok = str(generate())
    structlog.get_logger("t").info("x", detail=tok)
    assert tok not in buf.getvalue()


def test_level_filters() -> None:
    buf = io.StringIO()
    logs.configure("json", "warning", stream=buf)
    structlog.get_logger("t").info("quiet")
    assert buf.getvalue() == ""


def test_tracebacks_are_scrubbed_too() -> None:
    """A token in an exception message does not reach the rendered traceback."""
    buf = io.StringIO()
    logs.configure("json", "info", stream=buf)
    tok = str(generate())
    try:
        raise ValueError(f"bad thing with {tok}")
    except ValueError:
        structlog.get_logger("t").exception("job.crashed")
    assert tok not in buf.getvalue()
    assert "ValueError" in json.loads(buf.getvalue())["exception"]
