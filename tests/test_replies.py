"""The reply catalog (``relay.replies``): each name, code and enhanced status code agree (aiosmtpd qa style)."""

from __future__ import annotations

import re

import pytest

from relay import replies

REPLY = re.compile(r"^(?P<code>[2-5]\d\d) (?P<cls>[245])\.\d{1,3}\.\d{1,3} \S")
NAME = re.compile(r"^R(?P<code>\d{3})_[A-Z0-9_]+$")
CATALOG = {name: value for name, value in vars(replies).items() if name.startswith("R") and name[1:2].isdigit()}


def test_catalog_is_not_empty() -> None:
    """The meta-test looks at something (the naming convention finds the constants)."""
    assert {"R250_QUEUED", "R451_SPOOL_WRITE", "R550_UNKNOWN_USER"} <= set(CATALOG)


@pytest.mark.parametrize(("name", "value"), sorted(CATALOG.items()))
class TestEachReply:
    def test_name_follows_the_convention(self, name: str, value: str) -> None:
        """A constant is ``R<code>_<WHAT>`` in capitals."""
        assert NAME.match(name), name

    def test_code_then_enhanced_status_code(self, name: str, value: str) -> None:
        """The value is a 3-digit code, a space, an enhanced status code, a space and text."""
        assert isinstance(value, str)
        assert REPLY.match(value), value

    def test_name_code_and_class_agree(self, name: str, value: str) -> None:
        """The name's code is the value's code, and the enhanced code's class is the reply's first digit."""
        match = REPLY.match(value)
        assert match is not None, value
        assert name[1:4] == match["code"]
        assert match["code"][0] == match["cls"]

    def test_single_line(self, name: str, value: str) -> None:
        """No reply can break the SMTP line (no CR, LF or NUL), even after formatting."""
        formatted = value.format(*["x"] * value.count("{}"))

        assert not {"\r", "\n", "\0"} & set(formatted)
        assert len(formatted) <= 510


@pytest.mark.parametrize(("code", "enhanced"), sorted(replies.ENHANCED_BY_CODE.items()))
def test_codes_given_to_aiosmtpd_replies_agree_with_their_class(code: int, enhanced: str) -> None:
    """The enhanced code relay adds to a bare aiosmtpd reply is of the reply's class (5xx: 5.x.x)."""
    assert REPLY.match(replies.with_enhanced_code(f"{code} Some text"))
    assert str(code)[0] == enhanced[0]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("501 Syntax: RCPT TO: <address>", "501 5.5.4 Syntax: RCPT TO: <address>"),
        ("550 5.1.1 User unknown", "550 5.1.1 User unknown"),  # has one: unchanged
        ("250 OK", "250 OK"),  # only 4xx and 5xx
        ("599 Odd", "599 5.0.0 Odd"),  # a code without a table entry: its class
    ],
)
def test_with_enhanced_code(sent: str, expected: str) -> None:
    assert expected == replies.with_enhanced_code(sent)
