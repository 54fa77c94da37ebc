"""The ``relay`` command (``relay.cli.main``): ``queue`` in text and JSON, ``--version``, usage errors.

``relay check`` is tested with the configuration in ``tests/config/test_config.py``.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from relay import __version__
from relay.commands import cli
from relay.envelope import Outgoing
from relay.queue.spool import QueueEntry, Spool
from tests.conftest import UpstreamFactory, build_config, smtp_send
from tests.servers import RelayRunner
from tests.test_daemon import RelayProcess, write_config

UPSTREAMS = {"o365": {"host": "smtp.office365.com", "username": "a@rakennus.fi", "password_env": "O365_PW"}}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    _, path = build_config(tmp_path, upstreams=UPSTREAMS, company={"upstream": "o365"})
    return path


@pytest.fixture
def queued(tmp_path: Path, config_path: Path) -> tuple[QueueEntry, QueueEntry]:
    """One message waiting for its first attempt; one deferred after two attempts, one recipient each
    delivered, bounced and still waiting."""
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.setup()
    first, second = spool.commit([
        Outgoing("o365", "a@rakennus.fi", ("customer@example.com",), b"Subject: 1\r\n\r\nx\r\n", user="matti"),
        Outgoing("o365", "a@rakennus.fi", ("b@example.com", "c@example.com", "d@example.com"),
                 b"Subject: 2\r\n\r\nyy\r\n"),
    ])  # fmt: skip
    spool.claim(second.id, source="incoming")
    second = spool.update(
        replace(second, attempts=2, last_reply="451 4.7.500 Server busy", next_attempt_at=time.time() + 600,
                delivered=("b@example.com",), bounced=(("c@example.com", "550 5.1.1 User unknown"),)),
        state="deferred",
    )  # fmt: skip
    return first, second


def _without_age(line: str) -> list[str]:
    queue_id, state, size, age, user, sender = line.split()
    assert age.endswith("s") and 0 <= int(age[:-1]) < 60, age
    return [queue_id, state, size, user, sender]


class TestQueue:
    def test_text_lists_every_entry(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Like mailq: a header, then id, state, size, user and sender, recipients, attempts, the last reply,
        and each recipient's result so far."""
        first, second = queued

        code = cli.main(["queue", "-c", str(config_path)])

        out = capsys.readouterr().out.splitlines()
        assert 0 == code
        assert 9 == len(out), out
        assert ["QUEUE", "ID", "STATE", "SIZE", "AGE", "USER", "SENDER"] == out[0].split()
        assert out[0].index("STATE") == out[1].index("incoming")
        assert [first.id, "incoming", str(first.size), "matti", "a@rakennus.fi"] == _without_age(out[1])
        assert "    -> customer@example.com  attempts=0  " == out[2]
        assert [second.id, "deferred", str(second.size), "-", "a@rakennus.fi"] == _without_age(out[3])
        assert "    -> b@example.com, c@example.com, d@example.com  attempts=2  451 4.7.500 Server busy" == out[4]
        assert "    delivered: b@example.com" == out[5]
        assert "    bounced: c@example.com (550 5.1.1 User unknown)" == out[6]
        assert re.fullmatch(r"    next attempt in (59\d|600)s", out[7]), out[7]
        assert "-- 2 message(s) in queue" == out[8]

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
             "recipients": ["customer@example.com"], "delivered": [], "bounced": [], "attempts": 0,
             "last_reply": "", "next_attempt_at": None, "waiting_for": None, "kind": "mail", "notices": []},
            {"state": "deferred", "id": second.id, "user": None, "size": second.size,
             "recipients": ["b@example.com", "c@example.com", "d@example.com"], "delivered": ["b@example.com"],
             "bounced": [{"recipient": "c@example.com", "reply": "550 5.1.1 User unknown"}], "attempts": 2,
             "last_reply": "451 4.7.500 Server busy", "next_attempt_at": round(second.next_attempt_at),
             "waiting_for": "retry", "kind": "mail", "notices": []},
        ] == [{k: v for k, v in row.items() if k != "age"} for row in rows]  # fmt: skip
        assert all(isinstance(row["age"], int) and 0 <= row["age"] < 60 for row in rows)

    def test_a_damaged_envelope_is_listed_and_shown_as_damaged(
        self, tmp_path: Path, config_path: Path, queued: tuple[QueueEntry, QueueEntry],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """An envelope cut short (edited by hand, a disk fault) is not hidden from the listing, and ``--show``
        says what is wrong with it instead of a traceback."""
        damaged_id = queued[1].id[:-3] + ("FFF" if not queued[1].id.endswith("FFF") else "EEE")
        (tmp_path / "spool" / "deferred" / f"{damaged_id}.json").write_text('{"id": "BROKEN", "garbage": ')

        listed = cli.main(["queue", "-c", str(config_path)])
        text = capsys.readouterr().out
        as_json = cli.main(["queue", "-c", str(config_path), "--json"])
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        shown = cli.main(["queue", "-c", str(config_path), "--show", damaged_id])
        err = capsys.readouterr().err

        assert (0, 0, 1) == (listed, as_json, shown)
        assert f"{damaged_id}  deferred damaged envelope" in text and "-- 3 message(s) in queue" in text
        assert {"state": "deferred", "id": damaged_id, "damaged": True} in rows
        assert f"relay: {damaged_id}: its envelope is damaged and cannot be read\n" == err

    def test_a_reader_that_stops_early_gets_no_traceback(self, tmp_path: Path, config_path: Path) -> None:
        """``relay queue | head -1`` on a long queue: relay stops quietly when the pipe closes."""
        spool = Spool(tmp_path / "spool", fsync=False)
        spool.setup()
        spool.commit([Outgoing("o365", "a@rakennus.fi", (f"r{n}@example.com",), b"Subject: x\r\n\r\nx\r\n")
                      for n in range(1500)])  # fmt: skip
        command = [sys.executable, "-m", "relay", "queue", "-c", str(config_path)]

        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.readline()
            proc.stdout.close()
            err = proc.stderr.read()
            code = proc.wait(30)

        assert (0, b"") == (code, err)

    def test_empty_queue(self, tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A spool with nothing in it: the header and a count of 0."""
        Spool(tmp_path / "spool").setup()

        code = cli.main(["queue", "-c", str(config_path)])

        assert 0 == code
        assert "-- 0 message(s) in queue" == capsys.readouterr().out.splitlines()[-1]

    def test_missing_spool_is_an_error(self, tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A spool_dir that does not exist is not reported as an empty queue: probably the wrong config file."""
        code = cli.main(["queue", "-c", str(config_path), "--json"])

        out, err = capsys.readouterr()
        assert 1 == code
        assert "" == out
        assert (
            f"relay: spool directory {tmp_path / 'spool'} does not exist (has relay run with this config?)\n" == err
        )

    def test_spool_that_cannot_be_listed(
        self, tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A spool whose state directory cannot be listed is one line on stderr, exit 1, no traceback."""
        spool = Spool(tmp_path / "spool")
        spool.setup()
        (tmp_path / "spool" / "deferred").rmdir()
        (tmp_path / "spool" / "deferred").write_text("")

        code = cli.main(["queue", "-c", str(config_path)])

        out, err = capsys.readouterr()
        assert 1 == code
        assert "" == out
        deferred = tmp_path / "spool" / "deferred"
        expected = f"relay: cannot read the spool directory {deferred}: Not a directory (run as root or as relay's user)"
        assert [expected] == err.splitlines()

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
    def test_unreadable_spool(self, tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A spool owned by relay's user (0700), listed by someone else, is a permission error, not a traceback."""
        Spool(tmp_path / "spool").setup()
        (tmp_path / "spool").chmod(0)
        try:
            code = cli.main(["queue", "-c", str(config_path)])
        finally:
            (tmp_path / "spool").chmod(0o700)

        [line] = capsys.readouterr().err.splitlines()
        assert 1 == code
        assert line.startswith("relay: cannot read the spool directory") and "Permission denied" in line

    def test_bad_config_exits_1(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a usable config the queue cannot be found: the errors are printed and the exit code is 1."""
        path = tmp_path / "relay.yaml"
        path.write_text("spool_dir: [\n", encoding="utf-8")

        code = cli.main(["queue", "-c", str(path)])

        assert 1 == code
        assert "not valid YAML" in capsys.readouterr().err


    def test_bad_config_with_json_is_a_json_error(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A script reading ``--json`` gets the config's errors as a JSON object too (with the same exit
        code), not text it cannot parse."""
        path = tmp_path / "relay.yaml"
        path.write_text("spool_dir: [\n", encoding="utf-8")

        code = cli.main(["queue", "-c", str(path), "--json"])

        out, err = capsys.readouterr()
        assert 1 == code
        [line] = out.splitlines()
        row = json.loads(line)
        assert f"{path}: 1 error(s) in the config" == row["error"]
        assert ["not valid YAML" in problem for problem in row["problems"]] == [True]
        assert "" == err


class TestQueueWithConfigErrors:
    """Finding 4: a config with an error is refused at a reload and the daemon keeps its previous one; that
    is when the admin must see and manage the queue, so ``relay queue`` reads ``spool_dir`` alone and
    says the errors as a warning (as Postfix's mailq does with a bad main.cf)."""

    YAML_ERROR = "  from_name: Test Oy: Laskutus\n"  # an unquoted ': ', under company: (the file's last section)
    SCHEMA_ERROR = "bogus_key: 1\n"

    def test_a_yaml_error_elsewhere_lists_the_queue_with_a_warning(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:  # fmt: skip
        first, second = queued
        with config_path.open("a", encoding="utf-8") as file:
            file.write(self.YAML_ERROR)

        code = cli.main(["queue", "-c", str(config_path)])

        out, err = capsys.readouterr()
        assert 0 == code, err
        assert [first.id, second.id] == [line.split()[0] for line in out.splitlines() if line.startswith(first.id[:4])]
        assert "-- 2 message(s) in queue" == out.splitlines()[-1]
        warning, error = err.splitlines()
        assert (f"relay: warning: {config_path}: 1 error(s), so relay will not load it (relay check {config_path}); "
                f"relay queue goes on with spool_dir {config_path.parent / 'spool'}") == warning  # fmt: skip
        assert error.startswith("  error: company.from_name: not valid YAML: the value of from_name contains ': '")

    def test_json_stays_json_and_the_errors_go_to_stderr(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:  # fmt: skip
        """An unknown key (a schema error): the raw spool_dir of the parsed file; stdout is the entries only."""
        with config_path.open("a", encoding="utf-8") as file:
            file.write(self.SCHEMA_ERROR)

        code = cli.main(["queue", "-c", str(config_path), "--json"])

        out, err = capsys.readouterr()
        assert 0 == code, err
        assert [entry.id for entry in queued] == [json.loads(line)["id"] for line in out.splitlines()]
        assert f"relay: warning: {config_path}: 1 error(s)" in err
        assert "  error: bogus_key: unknown key" in err

    @pytest.mark.parametrize("broken", [YAML_ERROR, SCHEMA_ERROR])
    def test_actions_and_show_work_too(
        self, tmp_path: Path, config_path: Path, queued: tuple[QueueEntry, QueueEntry],
        capsys: pytest.CaptureFixture[str], broken: str,
    ) -> None:  # fmt: skip
        """--show, --hold, --release, --flush and --delete, each with the warning on stderr."""
        first, second = queued
        with config_path.open("a", encoding="utf-8") as file:
            file.write(broken)
        spool = Spool(tmp_path / "spool")

        assert 0 == cli.main(["queue", "-c", str(config_path), "--show", first.id])
        assert 0 == cli.main(["queue", "-c", str(config_path), "--hold", first.id])
        assert [first.id] == spool.ids("hold")
        assert 0 == cli.main(["queue", "-c", str(config_path), "--release", first.id])
        assert 0 == cli.main(["queue", "-c", str(config_path), "--flush"])
        assert [first.id, second.id] == spool.ids("incoming")
        assert 0 == cli.main(["queue", "-c", str(config_path), "--delete", second.id])
        assert None is spool.find(second.id)
        out, err = capsys.readouterr()
        assert f"queue id:     {first.id}" in out
        assert 5 == err.count("relay: warning: "), err

    def test_mailq_works_with_a_broken_config(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry]
    ) -> None:
        """``relay-sendmail -bp`` hands the same config to ``relay queue``."""
        with config_path.open("a", encoding="utf-8") as file:
            file.write(self.YAML_ERROR)

        done = subprocess.run([sys.executable, "-m", "relay", "sendmail", "-bp", "-c", str(config_path)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

        assert 0 == done.returncode, done.stderr
        assert "-- 2 message(s) in queue" in done.stdout
        assert "relay: warning: " in done.stderr


NOBODY = 65534  # the daemon's user in the tests that change owners (root only)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


def _chown_tree(path: Path, uid: int) -> None:
    for item in [path, *path.rglob("*")]:
        os.chown(item, uid, uid)


def _serve_config(folder: Path) -> Path:
    """A config the daemon loads (its one account is never reached: these starts stop before any delivery),
    readable by the daemon's user, with the spool in ``folder``."""
    path = folder / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "listeners": [{"address": "127.0.0.1", "port": 0}], "spool_dir": str(folder / "spool"),
        "upstreams": {"o365": {"host": "127.0.0.1", "port": 1, "security": "none"}},
        "company": {"upstream": "o365", "from_address": "a@rakennus.fi"}, "logging": {"format": "json"},
    }), encoding="utf-8")  # fmt: skip
    path.chmod(0o644)
    return path


class TestServeAndTheSpoolsOwner:
    """Finding 3: ``relay serve`` run once as root leaves root's files in relay's spool, and the daemon, as
    relay, then cannot start (exit 3, under systemd a restart every 5 s)."""

    @root_only
    @pytest.mark.parametrize("spool_made", [True, False])
    def test_serve_as_root_refuses_a_spool_that_belongs_to_another_user(self, spool_made: bool) -> None:
        """Exit 78 (EX_CONFIG), naming the owner and how to start relay as that user, before anything is
        written there; also before the first start, when the folder the spool is made in is that user's."""
        with tempfile.TemporaryDirectory() as name:
            folder = Path(name)
            config = _serve_config(folder)
            if spool_made:
                Spool(folder / "spool").setup()
                _chown_tree(folder / "spool", NOBODY)
            else:
                os.chown(folder, NOBODY, NOBODY)
            before = sorted(folder.rglob("*"))

            done = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(config)], capture_output=True,
                                  text=True, timeout=30, check=False)  # fmt: skip
            after = sorted(folder.rglob("*"))

        owner = pwd.getpwuid(NOBODY).pw_name
        what = f"the spool {folder / 'spool'}" if spool_made else f"{folder} (where relay makes the spool {folder / 'spool'})"
        assert 78 == done.returncode, done.stderr
        assert (f"relay: not starting as root: {what} belongs to {owner}, and the files relay would leave there as "
                f"root stop it from starting as {owner}. Start it as the service does: systemctl start relay; or by "
                f"hand as that user: runuser -u {owner} -- relay serve -c {config}\n") == done.stderr  # fmt: skip
        assert before == after

    @root_only
    def test_a_start_stopped_by_a_file_of_root_names_the_chown(self) -> None:
        """The daemon's user cannot read a deferred entry root left: the start still fails (exit 3), and the
        message says how to give the files back."""
        with tempfile.TemporaryDirectory() as name:
            folder = Path(name)
            folder.chmod(0o755)
            config = _serve_config(folder)
            spool = Spool(folder / "spool", fsync=False)
            spool.setup()
            [entry] = spool.commit([Outgoing("o365", "a@rakennus.fi", ("c@example.com",), b"Subject: 1\r\n\r\nx\r\n")])
            spool.claim(entry.id, source="incoming")
            spool.update(entry, state="deferred")
            _chown_tree(folder / "spool", NOBODY)
            os.chown(folder / "spool" / "deferred" / f"{entry.id}.json", 0, 0)
            as_relay = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

            done = subprocess.run([*as_relay, sys.executable, "-m", "relay", "serve", "-c", str(config)],
                                  capture_output=True, text=True, timeout=30, check=False, cwd=folder)  # fmt: skip

        owner = pwd.getpwuid(NOBODY).pw_name
        [line] = [line for line in done.stderr.splitlines() if line.startswith("relay: cannot start: ")]
        assert 3 == done.returncode, done.stderr
        assert line.endswith(f"Permission denied: '{folder / 'spool' / 'deferred' / entry.id}.json' (a file in the "
                             "spool belongs to another user, as a relay serve run as root leaves them: give them back "
                             f"to relay's user: chown -R {owner}: {folder / 'spool'})"), line  # fmt: skip


class TestServiceSecretHint:
    """A password only relay.service has (``password_env``): the printed ``systemd-run`` command names the
    config the admin gave (absolute: systemd-run starts it in /), ready to paste."""

    @pytest.mark.parametrize("command", [["check", "--connect", "relay.yaml"],
                                         ["send-test", "company", "-c", "relay.yaml"]])  # fmt: skip
    def test_the_command_names_the_real_config(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str],
    ) -> None:  # fmt: skip
        company = {"upstream": "o365", "from_address": "a@rakennus.fi"}
        _, config_path = build_config(tmp_path, upstreams=UPSTREAMS, company=company)
        monkeypatch.delenv("O365_PW", raising=False)
        monkeypatch.chdir(config_path.parent)

        code = cli.main(command)

        out = capsys.readouterr().out
        assert code != 0
        [hint] = [line for line in out.splitlines() if "systemd-run" in line]
        shown = " ".join(["relay", *command[:-1], str(config_path)])
        assert f"-p EnvironmentFile=FILE {shown} (FILE: " in hint, hint
        assert " CONFIG" not in hint


class TestUsage:
    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--version`` prints the package version and exits 0."""
        with pytest.raises(SystemExit) as exited:
            cli.main(["--version"])

        assert 0 == exited.value.code
        assert f"relay {__version__}" == capsys.readouterr().out.strip()

    @pytest.mark.parametrize("argv", [[], ["frobnicate"], ["queue", "--bogus"], ["serve", "-c", "a.yaml", "b.yaml"]])
    def test_usage_error_exits_2(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """A missing or unknown command is a usage error (argparse's exit code 2) with a usage line."""
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)

        assert 2 == exited.value.code
        assert "usage: relay" in capsys.readouterr().err


class TestQueueActions:
    """postsuper-like actions: by rename only, so they are safe while the daemon runs."""

    def test_hold_then_retry_then_delete(
        self, tmp_path: Path, config_path: Path, queued: tuple[QueueEntry, QueueEntry],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """An incoming entry is held, released back to incoming, then deleted with its body."""
        first, _ = queued
        spool = Spool(tmp_path / "spool")

        assert 0 == cli.main(["queue", "-c", str(config_path), "--hold", first.id])
        assert [first.id] == spool.ids("hold")
        assert 0 == cli.main(["queue", "-c", str(config_path), "--retry", first.id])
        assert first.id in spool.ids("incoming")
        assert 0 == cli.main(["queue", "-c", str(config_path), "--delete", first.id])
        assert None is spool.find(first.id)
        assert not spool.body_path(first.id).exists()
        assert "hold done (incoming -> hold)" in capsys.readouterr().out

    def test_an_entry_being_delivered_is_left_alone(
        self, tmp_path: Path, config_path: Path, queued: tuple[QueueEntry, QueueEntry],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """Deleting what the daemon has claimed fails with a reason, and deletes nothing."""
        first, _ = queued
        spool = Spool(tmp_path / "spool")
        spool.claim(first.id, source="incoming")

        assert 1 == cli.main(["queue", "-c", str(config_path), "--delete", first.id, "NOSUCHID", "../../etc/passwd"])
        err = capsys.readouterr().err
        assert "being delivered right now" in err
        assert "NOSUCHID: cannot delete: no such entry" in err
        assert "../../etc/passwd: cannot delete: no such entry" in err
        assert [first.id] == spool.ids("active")
        assert spool.body_path(first.id).exists()


class TestQueueTools:
    """--show, --release, --flush and --json for actions, on a spool the test fills."""

    def test_show_text(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The envelope, each recipient's state with its reply, and the message headers."""
        _, second = queued

        code = cli.main(["queue", "-c", str(config_path), "--show", second.id])

        out = capsys.readouterr().out.splitlines()
        assert 0 == code
        assert f"queue id:     {second.id}" == out[0]
        assert re.fullmatch(r"state:        deferred, next attempt in (59\d|600)s", out[1]), out[1]
        assert "sender:       a@rakennus.fi" in out and "account:      o365" in out
        assert "kind:         mail, 18 bytes, 2 attempt(s), 0 crash(es)" in out
        assert [
            "recipients:",
            "  b@example.com  delivered",
            "  c@example.com  bounced: 550 5.1.1 User unknown",
            "  d@example.com  deferred: 451 4.7.500 Server busy",
            "headers:",
            "  Subject: 2",
        ] == out[-6:]

    def test_show_json_and_an_unknown_id(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One JSON object per id with the list's keys plus the envelope and recipient states; an unknown
        id is an error object on stdout (as --delete prints one) and makes the exit code 1."""
        first, _ = queued

        code = cli.main(["queue", "-c", str(config_path), "--show", first.id, "0123456789ABCDEF", "--json"])

        out, err = capsys.readouterr()
        row, missing = [json.loads(line) for line in out.splitlines()]
        assert (1, "") == (code, err)
        assert {"id": "0123456789ABCDEF", "action": "show", "done": False, "error": "no such entry"} == missing
        assert (first.id, "incoming", "a@rakennus.fi", "o365", "mail") == (
            row["id"], row["state"], row["mail_from"], row["account"], row["kind"])  # fmt: skip
        assert [{"recipient": "customer@example.com", "state": "waiting", "reply": ""}] == row["recipient_states"]
        assert [["Subject", "1"]] == row["headers"]

    def test_show_hides_an_sms_subject(
        self, tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An SMS gateway may want its password in the Subject: --show never prints it."""
        spool = Spool(tmp_path / "spool", fsync=False)
        spool.setup()
        [sms] = spool.commit([Outgoing("o365", "a@rakennus.fi", ("+358401234567@gw.example.com",),
                                       b"Subject: palvelu-salasana\r\n\r\nKlo 8\r\n", kind="sms")])  # fmt: skip

        assert 0 == cli.main(["queue", "-c", str(config_path), "--show", sms.id])

        out = capsys.readouterr().out
        assert "palvelu-salasana" not in out
        assert "  Subject: (hidden: an SMS subject may carry the gateway password)" in out.splitlines()

    @pytest.mark.parametrize("header", [b"Resent-To: <", b"Reply-To: <", b'Cc: "x" <'])
    def test_show_prints_a_header_the_email_package_cannot_parse_as_it_is(
        self, tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str], header: bytes
    ) -> None:
        """relay queues such headers as received (only the ones it rewrites are parsed): --show must not crash."""
        spool = Spool(tmp_path / "spool", fsync=False)
        spool.setup()
        [entry] = spool.commit([Outgoing("o365", "a@rakennus.fi", ("x@example.com",),
                                         header + b"\r\nSubject: s\r\n\r\nbody\r\n")])  # fmt: skip

        assert 0 == cli.main(["queue", "-c", str(config_path), "--show", entry.id])

        out = capsys.readouterr().out.splitlines()
        assert f"  {header.decode()}" in out and "  Subject: s" in out

    def test_release_only_from_hold(
        self, tmp_path: Path, config_path: Path, queued: tuple[QueueEntry, QueueEntry],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """--release moves a held entry to incoming/; one that is not held is left where it is."""
        first, second = queued
        spool = Spool(tmp_path / "spool")
        spool.move(first.id, source="incoming", target="hold")

        code = cli.main(["queue", "-c", str(config_path), "--release", first.id, second.id])

        out, err = capsys.readouterr()
        assert 1 == code
        assert f"{first.id}: release done (hold -> incoming)\n" == out
        assert f"relay: {second.id}: cannot release: it is in deferred/\n" == err
        assert ([first.id], [second.id]) == (spool.ids("incoming"), spool.ids("deferred"))

    def test_flush_json(
        self, tmp_path: Path, config_path: Path, queued: tuple[QueueEntry, QueueEntry],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """--flush makes every deferred entry due now (incoming/), and nudges a running daemon."""
        first, second = queued
        spool = Spool(tmp_path / "spool")
        before = spool.nudged_at()
        time.sleep(0.01)

        code = cli.main(["queue", "-c", str(config_path), "--flush", "--json"])

        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert 0 == code
        assert [{"id": second.id, "action": "flush", "done": True, "from": "deferred", "to": "incoming"}] == rows
        assert sorted([first.id, second.id]) == spool.ids("incoming")
        assert before != spool.nudged_at()

    def test_action_json_reports_failures_on_stdout(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        Spool(config_path.parent / "spool").setup()

        code = cli.main(["queue", "-c", str(config_path), "--delete", "0123456789ABCDEF", "--json"])

        out, err = capsys.readouterr()
        assert (1, "") == (code, err)
        assert {"id": "0123456789ABCDEF", "action": "delete", "done": False, "error": "no such entry"} == json.loads(out)


class TestQueueIds:
    """Ids as admins type them: any case, a unique prefix (as postqueue users expect), from the real command."""

    def run(self, config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "queue", "-c", str(config_path), *args],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip

    def test_show_nosuch_json_prints_an_error_object(self, config_path: Path) -> None:
        """``--show NOSUCH --json`` prints an error object, as ``--delete NOSUCH --json`` does, and exits 1."""
        Spool(config_path.parent / "spool").setup()

        shown = self.run(config_path, "--show", "NOSUCH", "--json")
        deleted = self.run(config_path, "--delete", "NOSUCH", "--json")

        assert (1, "") == (shown.returncode, shown.stderr)
        assert {"id": "NOSUCH", "action": "show", "done": False, "error": "no such entry"} == json.loads(shown.stdout)
        assert {"id": "NOSUCH", "action": "delete", "done": False, "error": "no such entry"} == json.loads(deleted.stdout)

    def test_a_unique_prefix_in_lower_case(self, config_path: Path, queued: tuple[QueueEntry, QueueEntry]) -> None:
        """The shortest prefix that tells the entries apart, typed in lower case, shows and holds the entry."""
        first, second = queued
        prefix = second.id[: len(os.path.commonprefix([first.id, second.id])) + 1].lower()

        shown = self.run(config_path, "--show", prefix)
        held = self.run(config_path, "--hold", prefix)

        assert 0 == shown.returncode, shown.stderr
        assert f"queue id:     {second.id}" == shown.stdout.splitlines()[0]
        assert (0, f"{second.id}: hold done (deferred -> hold)\n") == (held.returncode, held.stdout)
        assert [second.id] == Spool(config_path.parent / "spool").ids("hold")

    def test_an_ambiguous_prefix_lists_the_candidates(
        self, config_path: Path, queued: tuple[QueueEntry, QueueEntry]
    ) -> None:
        """A prefix of both entries touches neither: the error names both ids, in text and in JSON."""
        first, second = queued
        prefix = os.path.commonprefix([first.id, second.id])[:6].lower()

        deleted = self.run(config_path, "--delete", prefix)
        shown = self.run(config_path, "--show", prefix, "--json")

        both = ", ".join(sorted([first.id, second.id]))
        why = f"ambiguous: 2 entries start with {prefix.upper()} ({both}); give more of the id"
        assert (1, f"relay: {prefix}: cannot delete: {why}\n") == (deleted.returncode, deleted.stderr)
        assert {"id": prefix, "action": "show", "done": False, "error": why} == json.loads(shown.stdout)
        spool = Spool(config_path.parent / "spool")
        assert ([first.id], [second.id]) == (spool.ids("incoming"), spool.ids("deferred"))

    def test_not_hex_is_no_entry(self, config_path: Path, queued: tuple[QueueEntry, QueueEntry]) -> None:
        """A name that is no id (a path, an empty string) matches nothing, never a file outside the spool."""
        shown = self.run(config_path, "--show", "../../etc/passwd", "")

        assert 1 == shown.returncode
        assert ["relay: ../../etc/passwd: no such entry", "relay: : no such entry"] == shown.stderr.splitlines()


class TestQueueToolsBesideTheDaemon:
    def test_show_hold_release_flush_while_relay_runs(
        self, tmp_path: Path, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Against a running relay with an hour's retry wait: --show tells why mail waits, --flush sends it
        within seconds (not at the next rescan, let alone in an hour), --hold keeps it, --release sends it."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "pw"})
        up.faults.data = "451 4.3.0 Try again later"
        port = relay_with(
            upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
            company={"from_address": "a@rakennus.fi", "upstream": "provider"},
            delivery={"retry_interval": 3600, "max_retry_interval": 3600},
        ).port  # fmt: skip
        config = str(tmp_path / "relay.yaml")
        spool = Spool(tmp_path / "spool")
        ids = [send(port, n).rsplit(" ", 1)[1] for n in range(2)]
        wait(lambda: spool.ids("deferred") == sorted(ids))

        assert 0 == cli.main(["queue", "-c", config, "--show", ids[0]])
        shown = capsys.readouterr().out.splitlines()
        assert "  customer@example.com  deferred: message refused after DATA: 451 4.3.0 Try again later" in shown
        assert 0 == cli.main(["queue", "-c", config, "--hold", ids[1]])
        assert [f"{ids[1]}: hold done (deferred -> hold)"] == without_logs(capsys.readouterr().out)
        up.faults.data = None

        assert 0 == cli.main(["queue", "-c", config, "--flush"])
        assert [f"{ids[0]}: flush done (deferred -> incoming)", "-- 1 deferred message(s) queued for delivery now"] == (
            without_logs(capsys.readouterr().out))  # fmt: skip
        up.wait_for(1, timeout=5)  # the daemon's own rescan would take up to 10 s
        wait(lambda: not spool.ids("incoming") and not spool.ids("active"))
        assert ([], [ids[1]]) == (spool.ids("deferred"), spool.ids("hold"))
        assert 0 == cli.main(["queue", "-c", config, "--release", ids[1]])
        up.wait_for(2, timeout=5)
        assert ["Lasku 0", "Lasku 1"] == [r.message["Subject"] for r in up.received]


    def test_a_failed_entry_shows_the_reply_that_failed_it(
        self, tmp_path: Path, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The provider refuses the customer (550) and takes the company's copy_to (250): the failed entry's
        last reply is the 550 that failed it, in the listing, --show and --json, not the copy's 250."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "pw"})
        up.faults.rcpt["customer@example.com"] = "550 5.1.1 User unknown"
        port = relay_with(
            upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
            company={"from_address": "a@rakennus.fi", "upstream": "provider", "copy_to": "arkisto@rakennus.fi"},
        ).port  # fmt: skip
        config = str(tmp_path / "relay.yaml")
        queue_id = send(port, 1).rsplit(" ", 1)[1]
        wait(lambda: Spool(tmp_path / "spool").ids("failed") == [queue_id])
        received = up.wait_for(2)  # the copy, and the failure notice to the sender
        assert [["a@rakennus.fi"], ["arkisto@rakennus.fi"]] == sorted(r.rcpt_tos for r in received)
        capsys.readouterr()

        assert 0 == cli.main(["queue", "-c", config, "--json", "--show", queue_id])
        [shown] = [json.loads(line) for line in without_logs(capsys.readouterr().out)]
        assert "550 5.1.1 User unknown" == shown["last_reply"]
        assert [{"recipient": "customer@example.com", "state": "bounced", "reply": "550 5.1.1 User unknown"},
                {"recipient": "arkisto@rakennus.fi", "state": "delivered", "reply": ""}] == shown["recipient_states"]
        assert 0 == cli.main(["queue", "-c", config])
        listed = without_logs(capsys.readouterr().out)
        assert any(line.startswith("    -> ") and line.endswith("attempts=1  550 5.1.1 User unknown") for line in listed)


def without_logs(out: str) -> list[str]:
    """The command's own lines: the in-process relay's console log lines share stdout."""
    return [line for line in out.splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[", line)]


def send(port: int, n: int) -> str:
    return smtp_send(port, "erp@legacy.local", ["customer@example.com"], b"Subject: Lasku %d\r\n\r\nx\r\n" % n)


def wait(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert done()


@pytest.mark.slow
def test_flush_from_another_process_wakes_the_daemon_process(
    tmp_path: Path, upstream: UpstreamFactory, processes: list[RelayProcess]
) -> None:
    """`relay queue --flush` run as its own process (as an admin would) against `relay serve`: the
    deferred message goes out within seconds although its next retry is an hour away."""
    up = upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": "pw-3"})
    up.faults.data = "451 4.3.0 Try again later"
    path = write_config(tmp_path, upstream, up, delivery={"retry_interval": 3600, "max_retry_interval": 3600})
    relay = RelayProcess(path).start()
    processes.append(relay)
    queue_id = send(relay.port, 1).rsplit(" ", 1)[1]
    relay.wait_event("delivery_attempt")
    up.faults.data = None

    shown = subprocess.run([sys.executable, "-m", "relay", "queue", "-c", str(path), "--show", queue_id, "--json"],
                           capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    flushed = subprocess.run([sys.executable, "-m", "relay", "queue", "-c", str(path), "--flush", "--json"],
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    up.wait_for(1, timeout=5)  # the daemon's own rescan would take up to 10 s

    assert "deferred" == json.loads(shown.stdout)["state"]
    assert [{"id": queue_id, "action": "flush", "done": True, "from": "deferred", "to": "incoming"}] == [
        json.loads(line) for line in flushed.stdout.splitlines()]  # fmt: skip
    assert "delivered" == relay.wait_event("delivery_attempt", count=2)["result"]


@pytest.mark.parametrize("form", [["check"], ["check", "-c"], ["check", "--config"]])
def test_check_takes_the_config_with_or_without_c(
    form: list[str], config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``relay serve -c FILE`` is the unit file's form; ``relay check FILE`` the README's: both take both."""
    code = cli.main([*form, str(config_path)])

    assert (0, f"{config_path}: OK") == (code, capsys.readouterr().out.split(" (")[0])


def test_check_warns_about_queued_mail_too_big_for_a_graph_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The o365 account became a Graph account while a 3.5 MB message waited: ``relay check`` says it needs
    the draft route's Mail.ReadWrite before the admin reloads (it said it would bounce and to send it again
    by SMTP, a second copy: the daemon delivers it by the draft route); a small one is not mentioned."""
    graph = {"type": "graph", "username": "yritys@yritys.fi", "auth": "oauth2",
             "oauth2": {"tenant": "yritys.onmicrosoft.com", "client_id": "app", "client_secret_env": "X"}}  # fmt: skip
    _, path = build_config(tmp_path, upstreams={"o365": graph}, company={"upstream": "o365"})
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.setup()
    big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 44_000
    spool.commit([Outgoing("o365", "yritys@yritys.fi", ("a@example.com",), big),
                  Outgoing("o365", "yritys@yritys.fi", ("b@example.com",), b"Subject: small\r\n\r\nx\r\n")])  # fmt: skip

    code = cli.main(["check", str(path)])

    err = capsys.readouterr().err
    assert 0 == code
    assert "1 queued message(s) of upstream o365 are over Microsoft Graph's 4 MB request size" in err
    assert "Mail.ReadWrite" in err and "SMTP" not in err
