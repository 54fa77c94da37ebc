"""The private parts of aiosmtpd (and of asyncio's StreamReader under it) that relay's listener uses.

``listener.RelaySMTP`` overrides three of aiosmtpd's private methods (a session that also knows the
local socket and OS user; the seeds' ``RCPT TO:<a@x.fi; b@y.fi>`` lists; a 421 instead of the greeting
over the connection limits) and calls three more from its own DATA reader (the idle timeout restarted at each chunk among them), which reads in chunks and
tolerates long lines where aiosmtpd's reads a line at a time, from aiosmtpd's own stream reader. An override of a method aiosmtpd has
renamed would silently never run, so every name and signature stands here and ``missing`` checks them
against the installed aiosmtpd (run by the test suite).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

TESTED = ">=1.4.6,<1.5"  # the aiosmtpd versions these names were checked against (pyproject pins the same)
# method -> its parameters, as relay overrides or calls it
OVERRIDDEN = {"_handle_client": ("self",), "_create_session": ("self",), "_getaddr": ("self", "arg"), "_timeout_cb": ("self",)}
CALLED = {
    "_set_post_data_state": ("self",),
    "_call_handler_hook": ("self", "command", "args"),
    "_reset_timeout": ("self", "duration"),
}


def missing() -> list[str]:
    """What relay relies on that the installed aiosmtpd (or asyncio) no longer has, as it expects it."""
    found = []
    for name, params in {**OVERRIDDEN, **CALLED}.items():
        method = getattr(SMTP, name, None)
        if method is None:
            found.append(f"aiosmtpd.smtp.SMTP.{name}")
        elif tuple(inspect.signature(method).parameters) != params:
            found.append(f"aiosmtpd.smtp.SMTP.{name}{inspect.signature(method)} (relay expects {params})")
    connected = getattr(SMTP, "_cb_client_connected", None)
    if connected is None or "self._reader = " not in inspect.getsource(connected):
        found.append("aiosmtpd.smtp.SMTP._reader (set in _cb_client_connected)")
    handle_client = getattr(SMTP, "_handle_client", None)
    if not callable(getattr(aiosmtpd.smtp, "sanitized_log", None)) or handle_client is None or (
        "sanitized_log(log." not in inspect.getsource(handle_client)
    ):
        found.append("aiosmtpd.smtp.sanitized_log (called by SMTP._handle_client)")
    loop = asyncio.new_event_loop()  # a reader is made for a loop; none needs to run
    try:
        if not isinstance(getattr(asyncio.StreamReader(loop=loop), "_buffer", None), bytearray):
            found.append("asyncio.StreamReader._buffer")
    finally:
        loop.close()
    return found


def reader(server: SMTP) -> asyncio.StreamReader:
    """The connection's stream reader (after STARTTLS, the one over TLS), which the DATA and AUTH readers
    read from directly."""
    return server._reader


def still_talking(server: SMTP) -> None:
    """Restart the connection's idle timeout, as aiosmtpd does at each command line: relay's DATA reader
    reads past aiosmtpd's loop, and a message still arriving after ``timeout`` seconds (35 MB over a
    1 Mbit/s line) was cut off as idle."""
    server._reset_timeout()


def end_transaction(server: SMTP) -> None:
    """Reset the envelope after DATA, as aiosmtpd's own ``smtp_DATA`` does."""
    server._set_post_data_state()  # type: ignore[no-untyped-call]


async def data_hook(server: SMTP) -> object:
    """The handler's ``handle_DATA``, called the way aiosmtpd calls it (``MISSING`` when it has none)."""
    return await server._call_handler_hook("DATA")


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put bytes read past the end of DATA back in front of the reader's buffer: they are the client's
    next (pipelined) commands."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SANITIZED_LOG: Callable[..., None] = aiosmtpd.smtp.sanitized_log


def _sanitized_log_if_enabled(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _SANITIZED_LOG(func, msg, *args, **kwargs)


def skip_disabled_command_logging() -> None:
    """Have aiosmtpd's ``sanitized_log`` look at the level first. aiosmtpd logs every command line twice
    (``debug`` and ``info``) through it, and it masks the AUTH secrets in its arguments (a regular
    expression over each) before asking the logger whether it logs at all: twelve times a message for
    nothing, as relay runs ``mail.log`` at ERROR (logs.py). Where the level is on, the line is masked
    and logged exactly as before."""
    aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled
