"""structlog set-up: JSON lines off a terminal (journald, collectors), console on a terminal.

A processor masks any field named like a secret and any token-shaped text in any string, so a
secret cannot reach a log line even by accident.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from daemon.tokens import TOKEN_RE

_SECRET_KEY = re.compile(r"(secret|password|passwd|credential|^token$|authorization)", re.I)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
MASK = "***"


def _mask_text(text: str) -> str:
    return TOKEN_RE.sub(lambda m: m.group(0)[:15] + MASK, text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _mask_text(value) if "gg_" in value else value
    if isinstance(value, dict):
        return {k: (MASK if _SECRET_KEY.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask secret-named fields and token-shaped strings in every event."""
    for key in list(event):
        if _SECRET_KEY.search(key):
            event[key] = MASK
        else:
            event[key] = _scrub(event[key])
    return event


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if use_json
                     else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # first, so tracebacks get scrubbed too
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
