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


SHOWN = 200  # characters of an unreadable reply shown in the log
LONG_TEXT = 512  # a reply line's text is cut here when it is longer than aiosmtplib reads (RFC 5321 4.5.3.1.5)


def printable(data: bytes, limit: int = SHOWN) -> str:
    """What a server sent, fit for a log line and a terminal: control characters escaped, cut at ``limit``."""
    text = data.decode("utf-8", "backslashreplace").rstrip("\r\n")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


class UnreadableReplyError(aiosmtplib.SMTPResponseException):
    """A reply relay cannot read: a line without a reply code, or more than ``MAX_RESPONSE_LENGTH``
    octets with no end. ``received`` is its start; ``replies`` those of a pipelined group read before
    it; the caller names the ``step`` and says whether the server had the whole message (``message_sent``)."""

    def __init__(self, received: bytes) -> None:
        super().__init__(-1, f"unreadable reply: {printable(received)}")
        self.received = printable(received)
        self.replies: list[aiosmtplib.SMTPResponse] = []
        self.step = ""
        self.message_sent = False


def _coded(line: bytes) -> bool:
    """A reply line: three digits, then a space, a hyphen or the line's end (RFC 5321 4.2)."""
    return line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n")


def _text(line: bytes) -> bytes:
    """A reply line's text; one longer than aiosmtplib reads (an 8 KB ``550``) is cut, not refused."""
    text = line[4:].strip(b" \t\r\n")
    return text if len(line) <= MAX_LINE_LENGTH else text[:LONG_TEXT] + b"..."


class _Replies(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while relay reads replies itself (``exchange``).

    aiosmtplib's protocol holds one parsed reply at a time and drops whatever arrives while that reply
    waits to be picked up: a second reply in another segment would be lost and every later command
    paired with the wrong answer. This one keeps every byte until its replies are read. It also reads
    what aiosmtplib refuses with an error code of -1 that is no SMTP code: a well-formed line over 8 KB
    is read by its code. The connection's end and flow control still reach aiosmtplib's protocol.
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
        """The next complete reply in the buffer (removed from it), or ``None`` while it is incomplete;
        ``UnreadableReplyError`` for what is no reply."""
        offset, lines = 0, []
        while (end := self.buffer.find(b"\n", offset)) != -1:
            line = bytes(self.buffer[offset : end + 1])
            if not _coded(line):
                raise UnreadableReplyError(line[: SHOWN * 4])
            offset = end + 1
            lines.append(_text(line))
            if line[3:4] != b"-":
                del self.buffer[:offset]
                return aiosmtplib.SMTPResponse(int(line[:3]), b"\n".join(lines).decode("utf-8", "surrogateescape"))
        if len(self.buffer) > MAX_RESPONSE_LENGTH:
            raise UnreadableReplyError(bytes(self.buffer[: SHOWN * 4]))
        return None

    async def wait(self) -> None:
        self._wake.clear()
        await self._wake.wait()


class Exchange:
    """The connection while relay writes to it and reads its replies itself (``exchange``)."""

    def __init__(self, protocol: SMTPProtocol, transport: asyncio.Transport, reader: _Replies) -> None:
        self.protocol = protocol
        self.transport = transport
        self.reader = reader

    @property
    def ended(self) -> bool:
        return self.reader.ended or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.ended:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the write buffer is over its high-water mark (flow control). The loop runs at least
        once: a connection lost while the writes still fit the buffers is noticed only then, and until it
        is, every write goes nowhere without an error."""
        await asyncio.sleep(0)
        await self.protocol._drain_helper()

    async def next_reply(self) -> aiosmtplib.SMTPResponse | None:
        """The next reply; ``None`` when the connection ended before it."""
        while (reply := self.reader.reply()) is None:
            if self.reader.ended:
                return None
            await self.reader.wait()
        return reply


@asynccontextmanager
async def exchange(smtp: aiosmtplib.SMTP) -> AsyncIterator[Exchange]:
    """The connection under aiosmtplib's command lock, its replies read by ``_Replies``. Bytes left after
    the last reply read (sent by nobody's asking) go back to aiosmtplib's buffer, where ``has_unread``
    sees them."""
    async with exclusive(smtp) as protocol:
        transport = cast(asyncio.Transport | None, protocol.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        reader = _Replies(protocol)
        reader.buffer.extend(protocol._buffer)
        del protocol._buffer[:]
        transport.set_protocol(reader)
        try:
            yield Exchange(protocol, transport, reader)
        finally:
            if not reader.ended:
                transport.set_protocol(protocol)
                protocol._buffer.extend(reader.buffer)


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
    ``timeout`` of the one before it (or of the write) raises ``PipelineTimeoutError`` (with the replies
    that came: each reply has its own ``timeout``, as each command alone would; a server that took 25 s
    for each of three RCPTs failed a 60 s budget for them all); the caller then drops the
    connection, which is out of step, as after ``UnreadableReplyError`` (with the replies before it).
    ``last_timeout``, when given, is asked for the wait for the last reply once the others came: the
    reply to a whole message (``BDAT ... LAST``), which a provider may take minutes to give.
    """
    async with exchange(smtp) as connection:
        replies: list[aiosmtplib.SMTPResponse] = []
        try:
            connection.write(b"".join(commands))
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout) as budget:
                while len(replies) < len(commands):
                    if last_timeout is not None and len(replies) == len(commands) - 1:
                        budget.reschedule(loop.time() + last_timeout())
                        last_timeout = None
                    elif replies and timeout is not None:
                        budget.reschedule(loop.time() + timeout)
                    reply = await connection.next_reply()
                    if reply is None:
                        break
                    replies.append(reply)
        except TimeoutError:
            raise PipelineTimeoutError(replies) from None
        except UnreadableReplyError as exc:
            exc.replies = replies
            raise
    return replies
