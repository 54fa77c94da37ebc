"""The trace field relay adds to every message it takes (RFC 5321 4.4), and the hop limit it keeps.

An SMTP server that takes a message MUST add a ``Received:`` field at the top (RFC 5321 4.4), as Postfix,
Exim and OpenSMTPD do. Without one, mail that loops (an upstream that is, by mistake, relay's own
listener, or a provider forwarding back to it) carries nothing to count: a tester saw one message go
round about 240 times a second. With it, a message that has passed ``MAX_HOPS`` servers is refused at
DATA with ``554 5.4.6``, Postfix's ``hopcount_limit`` and reply, and the loop ends at the first server
that counts.

The field names the client as the session gave it (its HELO name and address) and no more: no name
lookup (a broken DNS must not slow the intake), and nothing from it that is not printable ASCII. The
"by" name is the one relay greeted with, which the intake gives (``Submission.server``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.config.models import Config
from relay.envelope import Submission
from relay.errors import RefusedError

MAX_HOPS = 50  # Postfix's hopcount_limit: Received fields a message may already carry
_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x7e]")  # not printable ASCII, or a bracket of the comment syntax
MAX_HELO = 64  # octets of the client's HELO name shown (it chose them)


def check_hops(received: int) -> None:
    """Refuse a message that already passed ``MAX_HOPS`` servers: it is looping."""
    if received >= MAX_HOPS:
        raise RefusedError(f"554 5.4.6 Too many hops: the message passed {received} mail servers already "
                           "(a mail loop? an upstream that sends back to relay)")  # fmt: skip


def received_field(sub: Submission, config: Config) -> bytes:
    """``Received: from HELO ([address]) by HOST (relay) with ESMTP; DATE``, folded, CRLF-ended."""
    helo = _UNSAFE.sub("?", sub.helo or "unknown")[:MAX_HELO] or "unknown"
    client = _UNSAFE.sub("?", sub.client)
    origin = f"from {helo} ([{client}])" if sub.listener >= 0 else f"from {client}"  # (the drop directory)
    stamp = format_datetime(datetime.now(UTC))
    host = _UNSAFE.sub("?", sub.server or config.hostname or "localhost")
    return f"Received: {origin}\r\n\tby {host} (relay) with ESMTP;\r\n\t{stamp}\r\n".encode()
