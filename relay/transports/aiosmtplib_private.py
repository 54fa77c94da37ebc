"""The private parts of aiosmtplib (and of asyncio's stream protocol under it) that relay drives.

aiosmtplib's ``data()`` takes the whole message and copies it three times (line ends, dot-stuffing,
terminator), so ``smtp.py`` streams DATA itself through the client's protocol, the way aiosmtplib's
own ``execute_data_command`` does: under its command lock, with its reply bookkeeping and flow
control. aiosmtplib has no PIPELINING (RFC 2920) either: ``pipeline`` sends MAIL, RCPT... and DATA in
one write and reads their replies in order. Those are private names; they all stand here, so an
aiosmtplib upgrade that moves one breaks this module's check (``missing``, run by the test suite), not
a delivery in production.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import cast

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol

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


# aiosmtplib's quoting parses the address with email.utils each time; the same few senders and
# recipients come back message after message
_quoted = functools.lru_cache(maxsize=4096)(quote_address)


def command(verb: bytes, address: str, options: Iterable[str] = (), *, encoding: str = "ascii") -> bytes:
    """``MAIL FROM:<...>`` or ``RCPT TO:<...>`` with its options and line end, as aiosmtplib's ``mail()``
    and ``rcpt()`` write them (same quoting, same refusal of control characters)."""
    args = [verb + _quoted(address).encode(encoding), *(option.encode("ascii") for option in options)]
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


class _Replies(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while the replies to a pipelined group are read.

    aiosmtplib's protocol holds one parsed reply at a time and drops whatever arrives while that reply
    waits to be picked up: a second reply in another segment would be lost and every later command
    paired with the wrong answer. This one keeps every byte until ``pipeline`` has read its replies.
    The connection's end and flow control still reach aiosmtplib's protocol.
    """

    def __init__(self, owner: SMTPProtocol) -> None:
        self.owner = owner
        self.buffer = bytearray()
        self.ended = False
        self._wake = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        self._wake.set()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake.set()
        return False  # the transport closes; connection_lost tells aiosmtplib's protocol

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake.set()
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()

    def reply(self) -> aiosmtplib.SMTPResponse | None:
        """The next complete reply in the buffer (removed from it), or ``None`` while it is incomplete."""
        offset, lines = 0, []
        while (end := self.buffer.find(b"\n", offset)) != -1:
            line = bytes(self.buffer[offset : end + 1])
            if len(line) > MAX_LINE_LENGTH or not line[:3].isdigit():
                raise aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {line[:80]!r}")
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self.buffer[:offset]
                return aiosmtplib.SMTPResponse(int(line[:3]), b"\n".join(lines).decode("utf-8", "surrogateescape"))
        if len(self.buffer) > MAX_RESPONSE_LENGTH:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        return None

    async def wait(self) -> None:
        self._wake.clear()
        await self._wake.wait()


class PipelineTimeoutError(aiosmtplib.SMTPReadTimeoutError):
    """A reply of a pipelined group did not come in time; ``replies`` are those that did."""

    def __init__(self, replies: list[aiosmtplib.SMTPResponse]) -> None:
        super().__init__("Timed out waiting for server response")
        self.replies = replies


async def pipeline(
    smtp: aiosmtplib.SMTP, commands: list[bytes], *, timeout: float | None,
    last_timeout: Callable[[], float] | None = None,
) -> list[aiosmtplib.SMTPResponse]:
    """Write ``commands`` in one go and read their replies in order (RFC 2920).

    Returns one reply per command, or fewer when the server closed the connection first (a 421 to MAIL
    ends the session: the replies it gave are the caller's to judge). A reply that does not come within
    ``timeout`` raises ``PipelineTimeoutError`` (with the replies that came); the caller then drops the
    connection, which is out of step. ``last_timeout``, when given, is asked for the wait for the last
    reply once the others came: the reply to a whole message (``BDAT ... LAST``), which a provider may
    take minutes to give. Bytes after the last reply (sent by nobody's asking) stay in aiosmtplib's buffer, where
    ``has_unread`` sees them.
    """
    async with exclusive(smtp) as protocol:
        transport = cast(asyncio.Transport | None, protocol.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        reader = _Replies(protocol)
        reader.buffer.extend(protocol._buffer)
        del protocol._buffer[:]
        transport.set_protocol(reader)
        replies: list[aiosmtplib.SMTPResponse] = []
        try:
            transport.write(b"".join(commands))
            async with asyncio.timeout(timeout) as budget:
                while len(replies) < len(commands):
                    if last_timeout is not None and len(replies) == len(commands) - 1:
                        budget.reschedule(asyncio.get_running_loop().time() + last_timeout())
                        last_timeout = None
                    reply = reader.reply()
                    if reply is not None:
                        replies.append(reply)
                    elif reader.ended:
                        break
                    else:
                        await reader.wait()
        except TimeoutError:
            raise PipelineTimeoutError(replies) from None
        finally:
            if not reader.ended:
                transport.set_protocol(protocol)
                protocol._buffer.extend(reader.buffer)
    return replies
