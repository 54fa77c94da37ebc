"""The ``relay`` command (``relay.cli.main``): ``queue`` in text and JSON, ``--version``, usage errors.

``relay check`` is tested with the configuration in ``tests/test_config.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from relay import __version__, cli
from relay.envelope import Outgoing
from relay.spool import QueueEntry, Spool
from tests.conftest import build_config

UPSTREAMS = {"o365": {"host": "smtp.office365.com", "username": "a@rakennus.fi", "password_env": "O365_PW"}}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    _, path = build_config(tmp_path, upstreams=UPSTREAMS, company={"upstream": "o365"})
    return path


@pytest.fixture
def queued(tmp_path: Path, config_path: Path) -> tuple[QueueEntry, QueueEntry]:
    """One message waiting for its first attempt, one deferred after two attempts."""
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.setup()
    first, second = spool.commit([
        Outgoing("o365", "a@rakennus.fi", ("customer@example.com",), b"Subject: 1\r\n\r\nx\r\n", user="matti"),
        Outgoing("o365", "a@rakennus.fi", ("b@example.com", "c@example.com"), b"Subject: 2\r\n\r\nyy\r\n"),
    ])  # fmt: skip
    spool.claim(second.id, source="incoming")
    second = spool.update(replace(second, attempts=2, last_reply="451 4.7.500 Server busy"), state="deferred")
    return first, second


def _without_age(line: str) -> list[str]:
    queue_id, state, size, age, user, sender = line.split()
    assert age.endswith("s") and 0 <= int(age[:-1]) < 60, age
    return [queue_id, state, size, user, sender]


class TestQueue:
    def test_text_lists_every_entry(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Like mailq: id, state, size, user and sender, then recipients, attempts and the last reply."""
        first, second = queued

        code = cli.main(["queue", "-c", str(config_path)])

        out = capsys.readouterr().out.splitlines()
        assert 0 == code
        assert 5 == len(out), out
        assert [first.id, "incoming", str(first.size), "matti", "a@rakennus.fi"] == _without_age(out[0])
        assert "    -> customer@example.com  attempts=0  " == out[1]
        assert [second.id, "deferred", str(second.size), "-", "a@rakennus.fi"] == _without_age(out[2])
        assert "    -> b@example.com, c@example.com  attempts=2  451 4.7.500 Server busy" == out[3]
        assert "-- 2 message(s) in queue" == out[4]

    def test_json_one_object_per_line(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--json`` prints one JSON object per entry (and nothing else) for scripts and monitoring."""
        first, second = queued

        code = cli.main(["queue", "-c", str(config_path), "--json"])

        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert 0 == code
        assert [
            {"state": "incoming", "id": first.id, "user": "matti", "size": first.size,
             "recipients": ["customer@example.com"], "attempts": 0, "last_reply": ""},
            {"state": "deferred", "id": second.id, "user": None, "size": second.size,
             "recipients": ["b@example.com", "c@example.com"], "attempts": 2,
             "last_reply": "451 4.7.500 Server busy"},
        ] == [{k: v for k, v in row.items() if k != "age"} for row in rows]  # fmt: skip
        assert all(isinstance(row["age"], int) and 0 <= row["age"] < 60 for row in rows)

    def test_empty_queue(self, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A spool that does not exist yet is an empty queue, not an error."""
        code = cli.main(["queue", "-c", str(config_path)])

        assert 0 == code
        assert "-- 0 message(s) in queue" == capsys.readouterr().out.strip()

    def test_bad_config_exits_1(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a usable config the queue cannot be found: the errors are printed and the exit code is 1."""
        path = tmp_path / "relay.yaml"
        path.write_text("spool_dir: [\n", encoding="utf-8")

        code = cli.main(["queue", "-c", str(path)])

        assert 1 == code
        assert "not valid YAML" in capsys.readouterr().err


class TestUsage:
    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--version`` prints the package version and exits 0."""
        with pytest.raises(SystemExit) as exited:
            cli.main(["--version"])

        assert 0 == exited.value.code
        assert f"relay {__version__}" == capsys.readouterr().out.strip()

    @pytest.mark.parametrize("argv", [[], ["frobnicate"], ["queue", "--bogus"]])
    def test_usage_error_exits_2(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """A missing or unknown command is a usage error (argparse's exit code 2) with a usage line."""
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)

        assert 2 == exited.value.code
        assert "usage: relay" in capsys.readouterr().err
