"""The private parts of aiosmtplib (and of asyncio's stream protocol under it) that relay drives.

aiosmtplib's ``data()`` takes the whole message and copies it three times (line ends, dot-stuffing,
terminator), so ``smtp.py`` streams DATA itself through the client's protocol, the way aiosmtplib's
own ``execute_data_command`` does: under its command lock, with its reply bookkeeping and flow
control. Those are private names; they all stand here, so an aiosmtplib upgrade that moves one breaks
this module's check (``missing``, run by the test suite), not a delivery in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

# instance attributes of SMTPProtocol relay reads or sets; _drain_helper is asyncio's FlowControlMixin's
PRIVATE = ("_command_lock", "_response_pending", "_drain_helper", "_buffer")
TESTED = ">=5.1.2,<5.2"  # the aiosmtplib versions these names were checked against (pyproject pins the same)


def missing() -> list[str]:
    """The private names this module uses that the installed aiosmtplib no longer has."""
    loop = asyncio.new_event_loop()  # a protocol is made for a loop; none needs to run
    try:
        protocol = SMTPProtocol(loop=loop)
        return [f"aiosmtplib.protocol.SMTPProtocol.{name}" for name in PRIVATE if not hasattr(protocol, name)]
    finally:
        loop.close()


@asynccontextmanager
async def exclusive(smtp: aiosmtplib.SMTP) -> AsyncIterator[SMTPProtocol]:
    """The connection's protocol, held under aiosmtplib's command lock (no other command interleaves)."""
    protocol = smtp.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    async with protocol._command_lock:
        yield protocol


def expect_reply(protocol: SMTPProtocol) -> None:
    """Tell the protocol a reply is due (a connection lost before it comes is then an error)."""
    protocol._response_pending = True


async def drain(protocol: SMTPProtocol) -> None:
    """Wait while the transport's write buffer is over its high-water mark (flow control)."""
    await protocol._drain_helper()


def has_unread(smtp: aiosmtplib.SMTP) -> bool:
    """Did the server send something nobody asked for (bytes waiting in the protocol's buffer)?"""
    protocol = smtp.protocol
    return protocol is not None and bool(protocol._buffer)
