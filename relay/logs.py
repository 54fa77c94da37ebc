"""structlog set-up: JSON lines off a TTY (journald, files), readable colours on one.

Configured once at start (``configure``). Every stage logs through ``structlog.get_logger()`` with the
queue id, user and upstream bound in contextvars. aiosmtpd's stdlib ``mail.log`` goes through the same
renderer. ``redact`` is the last line of defence for secrets: any key that looks like one is masked
(passwords are also wrapped in ``credentials.Secret``, whose repr hides the value).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

_SECRET_KEYS = ("password", "secret", "token", "auth_data", "login_data", "credential")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_SECRET_KEY = re.compile("|".join(_SECRET_KEYS), re.IGNORECASE)


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask values of keys that name a secret."""
    for key in event:
        if _names_secret(key):
            event[key] = "..."
    return event


@functools.lru_cache(maxsize=4096)
def _names_secret(key: str) -> bool:
    """Decided once per key name: events reuse a few dozen names, and this check ran for every key of
    every event (a quarter of an event's cost, two events per message)."""
    return _SECRET_KEY.search(key) is not None


def enabled(name: str, level: int = logging.INFO) -> bool:
    """Whether logger ``name`` logs at ``level``: asked before building a hot path's event (one per message
    received, one per attempt), whose fields and structlog's bound logger cost more than the check (the
    standard library caches its answer) when the level drops the event anyway. Where structlog does not
    filter by level (a test's ``capture_logs``), every event is made, as structlog would make it."""
    processors = structlog.get_config()["processors"]
    if not processors or processors[0] is not structlog.stdlib.filter_by_level:
        return True
    return logging.getLogger(name).isEnabledFor(level)


def configure(
    *, fmt: Literal["auto", "json", "console"] = "auto", level: str = "info", stream: Any = None
) -> None:
    """Configure structlog and the stdlib root logger to render the same way."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if console
        else structlog.processors.JSONRenderer()
    )
    # Tracebacks without local variables: a frame's locals can hold a password (aiosmtplib's login).
    tail: list[Any] = [] if console else [
        structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
    ]
    structlog.configure(
        # filter_by_level first: an event below the level (``received`` at level warning) is dropped
        # before the time stamp, the context and the rest of the chain are made for nothing
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    # aiosmtpd logs every command and, at DEBUG, every DATA line; its warnings are about its own
    # API (deprecations), not about mail. relay logs what matters itself.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # httpx logs every token request and Graph call (INFO), httpcore each step of them (DEBUG): relay's
    # own events (delivery_attempt, refresh_token_rotated, upstream_down) say what matters, once.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
