"""The private names relay uses in aiosmtpd and aiosmtplib still exist, as relay expects them.

An upgrade that renames one would otherwise break relay silently: an override that never runs, or an
``AttributeError`` in the middle of a delivery. These fail naming the attribute.
"""

from __future__ import annotations

from importlib.metadata import version

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP
from aiosmtplib.protocol import SMTPProtocol
from packaging.specifiers import SpecifierSet

from relay.intake import aiosmtpd_private
from relay.transports import aiosmtplib_private


def test_aiosmtpd_has_what_the_listener_overrides_and_calls() -> None:
    assert aiosmtpd_private.missing() == []


def test_aiosmtplib_has_what_delivery_drives() -> None:
    assert aiosmtplib_private.missing() == []


@pytest.mark.parametrize(("package", "tested"), [
    ("aiosmtpd", aiosmtpd_private.TESTED), ("aiosmtplib", aiosmtplib_private.TESTED),
])  # fmt: skip
def test_the_installed_versions_are_the_tested_ones(package: str, tested: str) -> None:
    assert version(package) in SpecifierSet(tested), f"{package} {version(package)} was not checked: see relay's *_private.py"


def test_a_renamed_aiosmtpd_method_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(SMTP, "_getaddr")
    assert aiosmtpd_private.missing() == ["aiosmtpd.smtp.SMTP._getaddr"]


def test_a_changed_aiosmtpd_signature_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SMTP, "_getaddr", lambda self, arg, strict: (None, None))
    [found] = aiosmtpd_private.missing()
    assert found.startswith("aiosmtpd.smtp.SMTP._getaddr(self, arg, strict)")


def test_a_removed_aiosmtpd_log_helper_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """``skip_disabled_command_logging`` replaces it by name: gone or no longer called, that does nothing."""
    monkeypatch.delattr(aiosmtpd.smtp, "sanitized_log")
    assert aiosmtpd_private.missing() == ["aiosmtpd.smtp.sanitized_log (called by SMTP._handle_client)"]


def test_a_removed_aiosmtplib_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    original = SMTPProtocol.__init__

    def without_lock(self: SMTPProtocol, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        del self._command_lock

    monkeypatch.setattr(SMTPProtocol, "__init__", without_lock)
    assert aiosmtplib_private.missing() == ["aiosmtplib.protocol.SMTPProtocol._command_lock"]
