"""``relay check --connect``: every account is tried for real, and each failure says what to fix."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from relay.cli import main
from tests.conftest import UpstreamFactory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
        assert lines["closed"].startswith("FAILED") and "cannot connect" in lines["closed"]
        assert "nope" not in out

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
