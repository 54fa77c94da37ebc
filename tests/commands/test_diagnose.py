"""``relay check --connect``: every account is tried for real, and each failure says what to fix."""

from __future__ import annotations

import socket
from pathlib import Path

import aiosmtplib
import pytest
import yaml

from relay.commands.cli import main
from relay.commands.diagnose import CERT_HINT, WRONG_SECURITY_HINT, connect_hint
from relay.config.accounts import account_for
from tests.conftest import UpstreamFactory, build_config, free_port


class TestCheckConnect:
    def test_each_account_reports_its_own_problem(
        self, upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Good login, wrong password, untrusted certificate and a closed port, each named as such."""
        up = upstream("provider", security="starttls", accounts={"ok@rakennus.fi": "right", "bad@rakennus.fi": "x"})
        untrusted = {**upstream.account(up, "ok@rakennus.fi")}
        del untrusted["ca_file"]
        config = {
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {
                "good": upstream.account(up, "ok@rakennus.fi"),
                "wrongpw": upstream.account(up, "bad@rakennus.fi", password="nope"),
                "untrusted": untrusted,
                "closed": {"host": "127.0.0.1", "port": free_port(), "security": "ssl", "timeout": 5},
            },
            "company": {"from_address": "ok@rakennus.fi", "upstream": "good"},
        }
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump(config))

        code = main(["check", str(path), "--connect"])
        out = capsys.readouterr().out

        assert 1 == code
        lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAILED"))}
        assert lines["good"].startswith("ok") and "login accepted over starttls" in lines["good"]
        assert lines["wrongpw"].startswith("FAILED") and "535" in lines["wrongpw"]
        assert "wrong password, or the tenant's security defaults" in out
        assert lines["untrusted"].startswith("FAILED") and "certificate" in lines["untrusted"]
        assert f"-> {CERT_HINT}" in out  # as relay send-test says it (it said only the reason)
        assert lines["closed"].startswith("FAILED") and "cannot connect" in lines["closed"]
        port = config["upstreams"]["closed"]["port"]
        assert f"-> nothing accepts connections on 127.0.0.1:{port}: check the port (security: ssl is usually 465)" in out
        assert "nope" not in out
        # one AUTH per account tried, the wrong password's included: not PLAIN and then LOGIN (issue 16)
        assert [["PLAIN"], ["PLAIN"]] == up.auth_sessions() and ["bad@rakennus.fi"] == up.failed_logins

    def test_an_error_in_one_account_does_not_keep_the_others_from_being_tried(
        self, upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A missing password file is an error of ``relay check``; with ``--connect`` the other accounts were
        not tried at all, and nothing said so. Each is tried, the broken one failing with its reason."""
        up = upstream("provider", security="ssl", accounts={"ok@rakennus.fi": "right"})
        broken = {**upstream.account(up, "ok@rakennus.fi"), "password_file": str(tmp_path / "nope")}
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {"good": upstream.account(up, "ok@rakennus.fi"), "broken": broken},
            "company": {"from_address": "ok@rakennus.fi", "upstream": "good"},
        }))  # fmt: skip

        code = main(["check", str(path), "--connect"])
        out = capsys.readouterr().out
        lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAILED"))}

        assert 1 == code
        assert lines["good"].startswith("ok")
        assert lines["broken"].startswith("FAILED") and "nope" in lines["broken"]

    def test_all_good_exits_zero(
        self, upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """When every account logs in, the command succeeds."""
        up = upstream("provider", security="ssl", accounts={"ok@rakennus.fi": "right"})
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {"good": upstream.account(up, "ok@rakennus.fi")},
            "company": {"from_address": "ok@rakennus.fi", "upstream": "good"},
        }))  # fmt: skip

        assert 0 == main(["check", str(path), "--connect"])
        assert "login accepted over ssl" in capsys.readouterr().out

    def test_ca_file_problems_name_the_file(
        self, upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A missing ca_file, or one without a certificate, is named with its path, not as '[Errno 2]'."""
        up = upstream("provider", security="starttls", accounts={"ok@rakennus.fi": "right"})
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n")
        missing = tmp_path / "missing.pem"
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {
                "missing": {**upstream.account(up, "ok@rakennus.fi"), "ca_file": str(missing)},
                "junk": {**upstream.account(up, "ok@rakennus.fi"), "ca_file": str(junk)},
            },
            "company": {"from_address": "ok@rakennus.fi", "upstream": "missing"},
        }))  # fmt: skip

        code = main(["check", str(path), "--connect"])
        out = capsys.readouterr().out

        assert 1 == code
        lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAILED"))}
        assert lines["missing"].startswith("FAILED") and lines["missing"].endswith(f"ca_file {missing}: does not exist")
        assert lines["junk"].startswith("FAILED") and f"ca_file {junk}: no usable CA certificate in it" in lines["junk"]
        assert "Errno" not in out

    def test_ssl_on_a_starttls_port_says_which_security_to_use(
        self, upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Implicit TLS against a port that greets in plain text: the hint says to use starttls."""
        up = upstream("provider", security="starttls", accounts={"ok@rakennus.fi": "right"})
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {"o365": {**upstream.account(up, "ok@rakennus.fi"), "security": "ssl"}},
            "company": {"from_address": "ok@rakennus.fi", "upstream": "o365"},
        }))  # fmt: skip

        code = main(["check", str(path), "--connect"])
        out = capsys.readouterr().out

        assert 1 == code
        failed, hint = [line for line in out.splitlines() if line.startswith("FAILED") or "->" in line]
        assert failed.startswith("FAILED o365 (127.0.0.1:") and "WRONG_VERSION_NUMBER" in failed
        assert hint.strip() == f"-> {WRONG_SECURITY_HINT}"
        assert hint.strip().endswith("not ssl (465)")


def test_starttls_against_an_implicit_tls_port_gets_a_hint(
    upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both sides wait for the other to speak first: say what usually causes that silence."""
    up = upstream("provider", security="ssl", accounts={"ok@rakennus.fi": "right"})
    account = {**upstream.account(up, "ok@rakennus.fi"), "security": "starttls", "timeout": 1}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "spool_dir": str(tmp_path / "spool"), "upstreams": {"p": account},
        "company": {"from_address": "ok@rakennus.fi", "upstream": "p"},
    }))  # fmt: skip

    assert 1 == main(["check", str(path), "--connect"])
    out = capsys.readouterr().out
    assert "no answer within 1 s" in out
    assert "try security: ssl" in out


def test_a_host_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    """The resolver's own error (here for a service name, so no DNS query leaves the machine), wrapped as
    aiosmtplib wraps it, turns into "the name ... does not resolve", which a newcomer can act on."""
    config, _ = build_config(tmp_path, upstreams={"isp": {"host": "smtp.isp.example", "port": 465, "security": "ssl"}},
                             company={"from_address": "a@rakennus.fi", "upstream": "isp"})  # fmt: skip
    try:
        socket.getaddrinfo("127.0.0.1", "no-such-service-name")
    except socket.gaierror as resolver_error:
        try:
            raise aiosmtplib.SMTPConnectError(f"Error connecting to smtp.isp.example: {resolver_error}") from resolver_error
        except aiosmtplib.SMTPConnectError as wrapped:
            hint = connect_hint(wrapped, account_for(config, "isp"))
    assert "the name smtp.isp.example does not resolve: check the upstream's host (spelling)" in (hint or "")


def test_a_login_without_a_password_is_warned_about_and_named_by_check_connect(
    upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named upstream with a username and no password source: ``relay check`` said OK and send-test blamed
    the provider ("refused the session", exit 69). A warning now, and the probe names the missing password."""
    up = upstream("provider", security="ssl", accounts={"ok@rakennus.fi": "right"})
    account = {k: v for k, v in upstream.account(up, "ok@rakennus.fi").items() if k != "password_file"}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "spool_dir": str(tmp_path / "spool"),
        "upstreams": {"main": account},
        "company": {"from_address": "ok@rakennus.fi", "upstream": "main"},
    }))  # fmt: skip

    assert 0 == main(["check", str(path)])
    err = capsys.readouterr().err
    assert "upstreams.main.username: is set but no password is" in err
    assert 1 == main(["check", str(path), "--connect"])
    out = capsys.readouterr().out
    assert "FAILED" in out and "none is configured for the login ok@rakennus.fi" in out
    assert [] == up.logins
