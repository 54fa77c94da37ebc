"""Fuzzing the two places relay takes hostile input: the SMTP dialogue and the message it rewrites.

1. Generated SMTP sessions (``tests/fuzzing.py``: every command in odd casing, 8-bit, NULs, over-long
   lines, bare LF, several commands in one write, DATA bodies cut anywhere, the end marker too) are
   played over a raw socket against a real in-process daemon. Every reply must be a well-formed SMTP
   reply whose code makes sense for what was sent, never the internal-error 451; the daemon must log
   no ``session_error`` and no traceback; every ``250`` to a message names entries that are in the
   spool, and nothing is in the spool without one; afterwards a new connection still gets its 220.
2. ``prepare`` (identify, resolve, rewrite) on generated messages, with signature, copy_to, recipient
   rules and SMS on and off: it raises nothing but ``RefusedError``, and every message it queues has
   CRLF line ends only, no line over 998 octets, and parses with the stdlib email parser.

``RELAY_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` runs longer; ``bench/fuzz.py`` runs the same
generators for minutes against ``relay serve`` as its own process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, get_args

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relay.config.load import parse_config
from relay.config.models import Config
from relay.envelope import Submission
from relay.errors import RefusedError
from relay.intake.listener import COMMAND_LINE_MAX, check_recipient, parse_rcpt
from relay.prepare.pipeline import prepare
from relay.queue.spool import Spool, State
from tests.conftest import UpstreamFactory
from tests.fuzzing import (
    Exchange,
    Lines,
    Transcript,
    address,
    data_end,
    dialogues,
    message_problems,
    messages,
    play,
    relay_sections,
    violations,
)
from tests.servers import RelayRunner

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or examples, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
LOGGED_FAILURES = ("session_error", "delivery_crashed", "spool_write_failed")


@dataclass
class FuzzTarget:
    relay: RelayRunner
    spool: Spool
    queued: set[str] = field(default_factory=set)  # every id a 250 named, over all examples


@pytest.fixture
def target(upstream: UpstreamFactory, relay_with: Any) -> FuzzTarget:
    up = upstream("provider", security="ssl", accounts={"laskutus@rakennus.fi": "pw"})
    up.faults.mail = "451 4.3.0 try again later"  # deliveries fail: the spool keeps all that was accepted
    relay = relay_with(
        **relay_sections(upstream.account(up, "laskutus@rakennus.fi")),
        delivery={"retry_interval": 3600, "max_retry_interval": 3600, "notices": False},
    )
    return FuzzTarget(relay, Spool(relay.config.spool_dir))


class _Errors(logging.Handler):
    """stdlib log records at ERROR and above (asyncio's 'Exception in callback', aiosmtpd's own)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def logged_failures() -> Iterator[list[str]]:
    """Collect what the daemon logs that means a bug: a session error, a traceback, an ERROR record."""
    found: list[str] = []
    handler = _Errors()
    logging.getLogger().addHandler(handler)
    try:
        with capture_logs() as events:
            yield found
    finally:
        logging.getLogger().removeHandler(handler)
    found.extend(f"logged {e}" for e in events if e.get("event") in LOGGED_FAILURES or "exc_info" in e)
    found.extend(f"stdlib log {r.name}: {r.getMessage()}" for r in handler.records)


def spool_ids(spool: Spool) -> set[str]:
    return {queue_id for state in get_args(State) for queue_id in spool.ids(state)}


def responsive(port: int) -> list[str]:
    """A new connection gets 220, and NOOP gets 250."""
    out = play(port, [Lines((b"NOOP\r\n",))])
    codes = [ex.code for ex in out.exchanges]
    return [] if codes == [220, 250] else [f"a new connection afterwards got {codes} ({out.stuck or out.closed})"]


@fuzz_settings(120)
@given(dialogue=dialogues())
def test_hostile_dialogues_get_sane_replies_and_only_spooled_mail_gets_250(target: FuzzTarget, dialogue: Any) -> None:
    port = target.relay.port
    with logged_failures() as problems:
        out = play(port, dialogue)
        problems.extend(violations(out))
        problems.extend(responsive(port))
    target.queued.update(out.queued)
    problems.extend(f"250 for {i}, which is not in the spool" for i in out.queued if target.spool.find(i) is None)
    unanswered = spool_ids(target.spool) - target.queued
    problems.extend(f"{i} is in the spool but no 250 named it" for i in sorted(unanswered))
    assert [] == problems, "\n".join(f"{ex.sent[:300]!r} -> {ex.reply}" for ex in out.exchanges)


# region #### prepare ####


def _config(**toggles: bool) -> Config:
    sections = relay_sections({"host": "127.0.0.1", "port": 465, "security": "ssl"})
    if not toggles["signature"]:
        sections["company"].pop("signature")
    if not toggles["copy_to"]:
        sections["company"].pop("copy_to")
    if not toggles["rules"]:
        sections.pop("rewrite")
    if not toggles["sms"]:
        sections.pop("sms")
    data = {"spool_dir": "/nonexistent/relay-fuzz", **sections}
    return parse_config(yaml.safe_dump(data, allow_unicode=True), file="fuzz.yaml")


CONFIGS = {
    key: _config(signature=key[0], copy_to=key[1], rules=key[2], sms=key[3])
    for key in [(a, b, c, d) for a in (True, False) for b in (True, False) for c in (True, False) for d in (True, False)]
}


def _as_listener_takes(addresses: list[str], config: Config) -> tuple[str, ...]:
    """The RCPT arguments the listener would have accepted (parsed, then checked at RCPT)."""
    taken = []
    for typed in addresses:
        parsed, _ = parse_rcpt(f"<{typed}>")
        try:
            if parsed:
                check_recipient(parsed, config)
                taken.append(parsed)
        except RefusedError:
            pass
    return tuple(taken)


@fuzz_settings(300)
@given(content=messages(), sender=address(), rcpts=st.lists(address(), min_size=1, max_size=3),
       toggles=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))  # fmt: skip
def test_prepare_queues_only_clean_messages_or_refuses(
    content: bytes, sender: str, rcpts: list[str], toggles: tuple[bool, bool, bool, bool]
) -> None:
    config = CONFIGS[toggles]
    rcpt_tos = _as_listener_takes(rcpts, config)
    mail_from = parse_rcpt(f"<{sender}>")[0]
    if not rcpt_tos or mail_from is None:
        return  # the listener would not have reached DATA
    sub = Submission(mail_from=mail_from, rcpt_tos=rcpt_tos, content=content, client="127.0.0.1")
    try:
        prepared = prepare(config, sub)
    except RefusedError:
        return
    problems = [
        f"{m.kind} to {m.recipients}: {p}" for m in prepared.messages
        for p in message_problems(bytes(m.content), long_lines_kept=any("left in place" in n for n in m.notes))
    ]  # fmt: skip
    assert [] == problems


# endregion


class TestChecks:
    """The checks themselves can fail (a fuzz run that could never report anything would prove nothing)."""

    def test_internal_error_and_malformed_replies_are_reported(self) -> None:
        out = Transcript([
            Exchange(b"", [b"220 relay ESMTP\r\n"], "greeting"),
            Exchange(b"MAIL FROM:<a@x.fi>\r\n", [b"451 4.3.0 Temporary internal error, try again later\r\n"], "command"),
            Exchange(b"NOOP\r\n", [b"250 ok\n"], "command"),
            Exchange(b"RSET\r\n", [b"354 go ahead\r\n"], "command"),
            Exchange(b"NOOP\r\n", [], "command"),
        ])  # fmt: skip
        found = violations(out)
        assert 4 == len(found), found

    def test_a_line_after_an_auth_challenge_is_the_response_whatever_it_says(self) -> None:
        """``DATA`` is valid base64: sent while AUTH LOGIN waits for the password it gets 235, not 354."""
        out = Transcript([
            Exchange(b"", [b"220 relay ESMTP\r\n"], "greeting"),
            Exchange(b"AUTH LOGIN dXNlcg==\r\n", [b"334 UGFzc3dvcmQ6\r\n"], "command"),
            Exchange(b"DATA\r\n", [b"235 2.7.0 Authentication successful\r\n"], "data-command"),
            Exchange(b"DATA\r\n", [b"235 2.7.0 Authentication successful\r\n"], "data-command"),
        ])  # fmt: skip
        assert ["reply 3 to b'DATA\\r\\n': code 235 makes no sense here ('235 2.7.0 Authentication successful')"] == violations(out)

    def test_a_250_to_a_message_names_its_queue_ids(self) -> None:
        out = Transcript([Exchange(b"x", [b"250 2.0.0 Ok: queued as A1 B2\r\n"], "data")])
        assert ["A1", "B2"] == out.queued

    @pytest.mark.parametrize(
        ("data", "end"),
        [(b".\r\n", 3), (b"a\r\n.\r\n", 6), (b"a\n.\n", 4), (b"a\r\nb\n.\nc\r\n.\r\n", 13), (b"a\n.\r\n", None), (b"a\r\n", None)],
    )
    def test_data_end_follows_the_documented_rule(self, data: bytes, end: int | None) -> None:
        assert end == data_end(data)


class TestFound:
    """What the fuzzing found, each as the smallest dialogue that showed it (written before the fix)."""

    def test_unknown_command_with_control_characters_is_not_echoed_raw(self, target: FuzzTarget) -> None:
        """aiosmtpd echoes an unknown command in its 500 as sent: a NUL, a bare CR, 500 octets of it.
        Every reply is printable ASCII, at most 512 octets a line (RFC 5321 4.5.3.1.5)."""
        lines = (b"RSET\x00\r\n", b"NOOP\rX\r\n", b"\x1b[2J\r\n", b"X" * 508 + b"\r\n")
        out = play(target.relay.port, [Lines(lines)])
        assert [] == violations(out)
        assert [220, 500, 500, 500, 500] == [ex.code for ex in out.exchanges]

    def test_header_line_over_998_octets_only_with_its_name_is_refolded(self) -> None:
        """A field whose value alone fits 998 octets but not with ``Name: `` in front went out as it came
        (a 1,000-octet line: Gmail and Office 365 refuse the message)."""
        content = b"X-Mailer: " + b"x" * 990 + b"\r\nSubject: s\r\n\r\nbody\r\n"
        config = CONFIGS[(False, False, False, False)]
        sub = Submission(mail_from="erp@legacy.local", rcpt_tos=("a@x.fi",), content=content, client="127.0.0.1")
        [message] = prepare(config, sub).messages
        assert [] == message_problems(bytes(message.content))

    def test_long_lines_kept_in_a_nested_signed_part_are_noted(self) -> None:
        """A multipart/signed inside a multipart/mixed keeps its over-long line (re-encoding would break
        the signature), as a top-level one does, and says so in the notes as a top-level one does."""
        content = (
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b10"\r\n\r\n--b10\r\n'
            b'Content-Type: text/plain\r\n\r\nhi\r\n--b10\r\nContent-Type: multipart/signed; boundary="b11"\r\n\r\n'
            b"--b11\r\nContent-Type: text/plain\r\n\r\n" + b"L" * 999 + b"\r\n--b11--\r\n--b10--\r\n"
        )
        sub = Submission(mail_from="erp@legacy.local", rcpt_tos=("a@x.fi",), content=content, client="127.0.0.1")
        [message] = prepare(CONFIGS[(False, False, False, False)], sub).messages
        assert b"L" * 999 + b"\r\n" in bytes(message.content)
        assert [n for n in message.notes if "left in place" in n], message.notes

    @pytest.mark.parametrize("size", [COMMAND_LINE_MAX + 1, 70_000, 300_000])
    def test_auth_response_over_the_line_limit_gets_500_5_5_6(self, target: FuzzTarget, size: int) -> None:
        """An AUTH response line longer than the reader's limit (aiosmtpd's was 1,001 octets; relay's is
        ``COMMAND_LINE_MAX``) raised ValueError in aiosmtpd's challenge_auth: logged as session_error,
        answered 451 (or, once over the read buffer, the rest of the line was read as commands).
        RFC 4954 4: 500 5.5.6, and the session goes on."""
        with logged_failures() as problems:
            lines = (b"EHLO erp\r\n", b"AUTH PLAIN\r\n", b"A" * size + b"\r\n", b"NOOP\r\n")
            out = play(target.relay.port, [Lines(lines)])
        assert [] == problems + violations(out)
        assert [220, 250, 334, 500, 250] == [ex.code for ex in out.exchanges]
        assert out.exchanges[3].reply[0].startswith(b"500 5.5.6 ")

    def test_top_level_content_type_with_one_long_token_is_refolded_when_the_body_is_rewritten(self) -> None:
        """``Content-Type: invoicexxx...`` (one 1,000-octet token) and 8-bit text: the body repair sets the
        charset, the email generator writes the field again and cannot break the token: a 999-octet line."""
        content = b"Content-Type: invoice" + b"x" * 990 + b"\r\n\r\nh\xe4\r\n"
        sub = Submission(mail_from="erp@legacy.local", rcpt_tos=("a@x.fi",), content=content, client="127.0.0.1")
        for toggles in [(False, False, False, False), (True, False, False, False)]:
            [message] = prepare(CONFIGS[toggles], sub).messages
            assert [] == message_problems(bytes(message.content))
