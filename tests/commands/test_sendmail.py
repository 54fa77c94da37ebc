"""The sendmail command (``relay.sendmail``): a subprocess pipes a message to a running relay, as cron
and PHP's mail() do; what arrives at the provider, and sendmail's exit codes."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relay import osuser
from relay.commands import sendmail
from tests.conftest import UpstreamFactory, free_port, queue_entries
from tests.servers import RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]
HOST = socket.gethostname()


def run_sendmail(args: list[str], data: bytes = b"", *, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """``relay sendmail ARGS < data`` as a separate process (the environment without the tests' RELAY_*)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [*(command or [sys.executable, "-m", "relay", "sendmail"]), *args],
        input=data, capture_output=True, env={**clean, **(env or {})}, timeout=60, check=False,
    )  # fmt: skip


class Setup:
    """A provider, relay in front of it, and the config file a sendmail command on this machine reads."""

    def __init__(self, up: Upstream, relay: RelayRunner, config: Path) -> None:
        self.up, self.relay, self.config = up, relay, config


@pytest.fixture
def setup(upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path) -> Setup:
    return _start(upstream, relay_with, tmp_path)


@pytest.fixture
def sms_setup(upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path) -> Setup:
    """The same, with an SMS gateway: a phone number at ``sms`` goes to ``+358...@gw.example``."""
    return _start(upstream, relay_with, tmp_path, sms={"domain": "sms", "gateway": "{number}@gw.example"})


def _start(upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, **extra: Any) -> Setup:
    up = upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "pw"})
    order = ["envelope_sender", "os_user"] if osuser.available() else ["envelope_sender"]
    relay = relay_with(
        upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
        company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
        users={
            "matti": {"addresses": ["matti@erp.local"], "from_address": "matti@rakennus.fi"},
            "minä": {"from_address": "mina@rakennus.fi", "os_users": [os.getuid()]},
        },
        identify={"order": order},
        **extra,
    )
    # the daemon's file says port 0 (the OS picks one); the command must find the port it got
    data: dict[str, Any] = yaml.safe_load((tmp_path / "relay.yaml").read_text(encoding="utf-8"))
    data["listeners"][0]["port"] = relay.port
    config = tmp_path / "client.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return Setup(up, relay, config)


CRON_LIKE = (
    b"To: Asiakas <asiakas@example.com>\n"
    b"Cc: kopio@example.com\n"
    b"Bcc: salainen@example.com,\n"
    b" toinen.salainen@example.com\n"
    b"Subject: Raportti\n"
    b"\n"
    b"Hyv\xe4\xe4 p\xe4iv\xe4\xe4\n"  # Latin-1, no MIME headers: what an old Unix program writes
    b".\n"
    b"viimeinen rivi\n"
)


class TestThroughRelay:
    def test_t_i_bare_lf_latin1_bcc_removed_sent_as_the_os_user(self, setup: Setup) -> None:
        """``sendmail -t -i``: recipients from To/Cc/Bcc, Bcc gone, LF -> CRLF, the 8-bit text and the
        lone "." line kept; sent as the relay user mapped to this process's OS user."""
        done = run_sendmail(["-t", "-i"], CRON_LIKE, env={"RELAY_CONFIG": str(setup.config)})
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        assert sorted(["asiakas@example.com", "kopio@example.com", "salainen@example.com",
                       "toinen.salainen@example.com"]) == sorted(got.rcpt_tos)  # fmt: skip
        assert None is got.message["Bcc"] and b"salainen" not in got.content
        assert b"\n" not in got.content.replace(b"\r\n", b"")
        assert "Hyvää päivää\n.\nviimeinen rivi\n" == got.message.get_content().replace("\r\n", "\n")
        if osuser.available():
            assert "mina@rakennus.fi" == got.mail_from

    def test_f_and_recipients_as_arguments_and_a_lone_dot_ends_the_input(self, setup: Setup) -> None:
        """``sendmail -f sender rcpt...`` without -i: the sender identifies the user, every argument's
        addresses are recipients (a bare name gets this host's name), input ends at a lone "." line."""
        data = b"Subject: Tilaus\n\nensimmainen\n.\nei tata\n"

        done = run_sendmail(["-c", str(setup.config), "-f", "matti@erp.local", "--",
                             "a@example.com", "b@example.com, C <c@example.com>", "root"], data)  # fmt: skip
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        assert "matti@rakennus.fi" == got.mail_from
        assert ["a@example.com", "b@example.com", "c@example.com", f"root@{HOST}"] == got.rcpt_tos
        assert b"ensimmainen" in got.content and b"ei tata" not in got.content

    def test_cron_mail_from_root_gets_no_reply_to_root(self, setup: Setup) -> None:
        """Issue 16: cron runs ``sendmail -FCronDaemon -i -B8BITMIME -oem root`` with ``From: root (Cron
        Daemon)``; relay replaces the sender, and ``root`` (or ``root@<host>``) must not become the
        Reply-To a reader's answer goes to."""
        data = (f"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@{HOST}> /usr/local/bin/backup\n"
                "Content-Type: text/plain; charset=UTF-8\n\nbackup done\n").encode()  # fmt: skip

        done = run_sendmail(["-c", str(setup.config), "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], data)
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        header = got.content.split(b"\r\n\r\n")[0]
        assert b"\r\nreply-to:" not in b"\r\n" + header.lower()
        assert got.message["From"].addresses[0].addr_spec.endswith("@rakennus.fi")

    def test_a_refused_recipient_is_67_and_the_others_still_get_it(self, setup: Setup) -> None:
        """relay's 5xx to one RCPT (an SMS number with no SMS route): exit 67 (EX_NOUSER), one line naming
        it on stderr, and the message goes to the accepted recipient."""
        done = run_sendmail(["-c", str(setup.config), "-i", "ok@example.com", "0401234567@sms"], b"Subject: x\n\nx\n")
        [got] = setup.up.wait_for(1)

        assert sendmail.EX_NOUSER == done.returncode
        [line] = done.stderr.decode().splitlines()
        assert line.startswith("relay-sendmail: recipient 0401234567@sms refused: 550 5.1.2 ")
        assert ["ok@example.com"] == got.rcpt_tos

    def test_bp_lists_the_queue(self, setup: Setup) -> None:
        """``sendmail -bp`` (mailq) lists relay's queue with the daemon's config."""
        done = run_sendmail(["-bp", "-c", str(setup.config)])

        assert 0 == done.returncode, done.stderr
        assert b"message(s) in queue" in done.stdout


def test_more_recipients_than_relay_takes_at_once_go_in_a_second_transaction(
    upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
) -> None:
    """relay answers the RCPT over ``limits.max_recipients`` with 452: relay-sendmail sends the message to
    those taken and the rest in a new transaction (RFC 5321 4.5.3.1.10). It exited 75 after the first
    part, and cron, which never tries again, lost the rest of the list."""
    setup = _start(upstream, relay_with, tmp_path, limits={"max_recipients": 3})
    many = [f"asiakas{n}@example.com" for n in range(7)]

    done = run_sendmail(["-i", "-f", "matti@erp.local", *many], b"Subject: s\n\nx\n",
                        env={"RELAY_CONFIG": str(setup.config)})  # fmt: skip
    got = setup.up.wait_for(3)

    assert (0, b"") == (done.returncode, done.stderr)
    assert sorted(many) == sorted(r for message in got for r in message.rcpt_tos)
    assert [3, 3, 1] == sorted((len(message.rcpt_tos) for message in got), reverse=True)


def test_huge_input_is_refused_with_the_size_limit_without_holding_it_in_memory(
    upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
) -> None:
    """A runaway cron job pipes 100 MB to sendmail while relay takes at most 1 MB: exit 65 with relay's
    limit in words, nothing sent, and the command's memory stays far below the input's size (it stops
    keeping input once the daemon's announced SIZE is passed, and reads the rest only to discard it)."""
    up = upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "pw"})
    relay = relay_with(upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
                       company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
                       limits={"max_message_size": "1M"})  # fmt: skip
    config = tmp_path / "client.yaml"
    config.write_text(f"listeners: [{{address: 127.0.0.1, port: {relay.port}}}]\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    command = [sys.executable, "-m", "relay", "sendmail", "-c", str(config), "-i", "root"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=clean)
    assert process.stdin is not None and process.stderr is not None
    line = b"x" * 1023 + b"\n"
    for _ in range(100 * 1024):  # 100 MB, written as a program writes its output
        process.stdin.write(line)
    process.stdin.flush()  # all but a pipe's worth is read: the command waits for the end of the input
    peak = _peak_rss_kib(process.pid)  # since its exec (a wait4 maxrss would count the forked pytest too)
    process.stdin.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    process.wait(60)

    assert sendmail.EX_DATAERR == process.returncode, stderr
    assert "message too big: relay takes at most 1048576 bytes (limits.max_message_size); nothing was sent" in stderr
    assert peak < 60 * 1024, f"peak RSS {peak} KiB after 100 MB of input"
    assert [] == up.received


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


class TestRelayDown:
    """relay stopped, restarting, upgraded or crashing: the mail waits in the drop directory (exit 0) and
    goes when relay runs, as Postfix's sendmail leaves it in maildrop/ for pickup (cron and PHP's mail()
    never try again after a 75)."""

    def test_the_mail_waits_in_the_drop_directory_and_goes_rewritten_when_relay_starts(self, setup: Setup) -> None:
        drop = setup.relay.config.spool_dir / "maildrop"
        setup.relay.close()  # relay stopped: nothing listens on the port the command's config names

        done = run_sendmail(["-t", "-i"], b"From: root (Cron Daemon)\n" + CRON_LIKE,
                            env={"RELAY_CONFIG": str(setup.config)})  # fmt: skip

        assert 0 == done.returncode, done.stderr
        [line] = done.stderr.decode().splitlines()
        assert line.startswith("relay-sendmail: relay did not answer (Connection refused at 127.0.0.1:")
        assert line.endswith(f"the mail waits in {drop} and is sent when relay takes it")
        [waiting] = [p for p in drop.iterdir() if p.name != "bad"]
        assert b"\nDate: " in waiting.read_bytes()  # dated when written (Postfix: postdrop's time), not when taken
        assert 0o640 == waiting.stat().st_mode & 0o777  # readable by relay through the directory's group
        assert [] == setup.up.received

        with capture_logs() as logs:
            again = RelayRunner(setup.relay.config, config_path=setup.relay.config_path).start()
            try:
                [got] = setup.up.wait_for(1)
                _wait(lambda: not waiting.exists())
            finally:
                again.close()

        # as the same message through SMTP: recipients from To/Cc/Bcc, Bcc gone, sent as the OS user's
        # relay user (the drop file's owner), its From replaced by that user's
        assert sorted(["asiakas@example.com", "kopio@example.com", "salainen@example.com",
                       "toinen.salainen@example.com"]) == sorted(got.rcpt_tos)  # fmt: skip
        assert None is got.message["Bcc"] and b"salainen" not in got.content
        assert "Hyvää päivää\n.\nviimeinen rivi\n" == got.message.get_content().replace("\r\n", "\n")
        sender = "mina@rakennus.fi" if osuser.available() else "toimisto@rakennus.fi"
        assert sender == got.mail_from
        assert sender == got.message["From"].addresses[0].addr_spec
        assert ["bad"] == [p.name for p in drop.iterdir()] and [] == list((drop / "bad").iterdir())
        [received] = [e for e in logs if e["event"] == "received"]
        assert ("maildrop", "maildrop", waiting.name) == (received["via"], received["client"], received["maildrop_file"])
        assert f"uid {os.getuid()}" in received["os_user"]
        if osuser.available():
            assert ("minä", "os_user") == (received["user"], received["identified_by"])

    def test_with_relay_running_nothing_goes_to_the_drop_directory(self, setup: Setup) -> None:
        drop = setup.relay.config.spool_dir / "maildrop"
        assert 0o3733 == drop.stat().st_mode & 0o7777  # made by the daemon at its start

        done = run_sendmail(["-c", str(setup.config), "-i", "a@example.com"], b"Subject: x\n\nx\n")
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        assert ["a@example.com"] == got.rcpt_tos
        assert ["bad"] == [p.name for p in drop.iterdir()]

    def test_over_the_size_limit_is_65_and_nothing_is_left(self, tmp_path: Path) -> None:
        """The drop takes what relay would: ``limits.max_message_size`` (65 as relay's 552 would be)."""
        drop = tmp_path / "maildrop"
        drop.mkdir()
        config = tmp_path / "relay.yaml"
        config.write_text(f"listeners: [{{address: 127.0.0.1, port: {free_port()}}}]\nmaildrop_dir: {drop}\n"
                          "limits: {max_message_size: 1K}\n")  # fmt: skip

        done = run_sendmail(["-c", str(config), "-i", "a@example.com"], b"Subject: x\n\n" + b"x" * 2000)

        assert sendmail.EX_DATAERR == done.returncode
        assert "message too big: relay takes at most 1024 bytes" in done.stderr.decode()
        assert [] == list(drop.iterdir())

    @pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                        reason="needs root to run the command as another user")  # fmt: skip
    def test_another_os_user_s_mail_is_sent_as_that_user_and_others_cannot_list_it(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """Run as nobody (relay as root here, as relay's user in the package): the drop file is nobody's
        and the pickup identifies nobody by the file's owner (``os_user``), which nobody cannot forge; nobody
        cannot list the drop directory."""
        shared = Path(tempfile.mkdtemp(prefix="relay-maildrop-"))  # tmp_path is root's alone (0700)
        try:
            shared.chmod(0o755)
            up = upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "pw"})
            relay = relay_with(
                upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
                company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
                users={"nobody": {"from_address": "nobody@rakennus.fi", "os_users": ["nobody"]}},
                identify={"order": ["os_user"]}, maildrop_dir=str(shared / "maildrop"),
            )  # fmt: skip
            config = shared / "client.yaml"
            config.write_text(f"listeners: [{{address: 127.0.0.1, port: {free_port()}}}]\n"
                              f"maildrop_dir: {shared / 'maildrop'}\n")  # fmt: skip
            config.chmod(0o644)
            as_nobody = ["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                         sys.executable, "-m", "relay", "sendmail"]  # fmt: skip

            done = run_sendmail(["-c", str(config), "-i", "a@example.com"], b"Subject: x\n\nx\n",
                                command=as_nobody, env={"PYTHONPATH": str(Path(sendmail.__file__).parents[2])})
            listing = subprocess.run([*as_nobody[:5], "ls", str(shared / "maildrop")], capture_output=True)
            [got] = up.wait_for(1)

            assert 0 == done.returncode, done.stderr
            assert "nobody@rakennus.fi" == got.mail_from
            assert 0 != listing.returncode and b"Permission denied" in listing.stderr
            assert relay.config.maildrop == shared / "maildrop"
        finally:
            shutil.rmtree(shared)


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class TestReadingInput:
    MB = 1 << 20

    def _never(self) -> int:
        raise AssertionError("the daemon was asked for its size limit")

    def test_usual_mail_asks_nothing(self) -> None:
        assert b"Subject: x\n\nx\n" == sendmail.read_input(io.BytesIO(b"Subject: x\n\nx\n"), self._never, dot_ends=True)

    def test_big_mail_under_the_daemons_limit_is_kept_whole(self) -> None:
        data = b"y" * (3 * self.MB)
        assert data == sendmail.read_input(io.BytesIO(data), lambda: 35 * self.MB, dot_ends=False)

    def test_a_lone_dot_ends_the_message_before_any_limit(self) -> None:
        """Without -i, what follows a lone "." line is not part of the message: read, never counted."""
        stream = io.BytesIO(b"Subject: x\n\nbody\n.\n" + b"z" * (3 * self.MB))
        data = sendmail.read_input(stream, self._never, dot_ends=True)
        assert b"Subject: x\r\n\r\nbody\r\n" == sendmail.read_message(data, dot_ends=True)
        assert b"" == stream.read()  # the writer's output was read to its end

    def test_over_the_daemons_limit_is_65_and_the_input_is_read_to_its_end(self) -> None:
        stream = io.BytesIO(b"y" * (5 * self.MB))
        with pytest.raises(sendmail.Failure) as refused:
            sendmail.read_input(stream, lambda: 2 * self.MB, dot_ends=False)
        assert sendmail.EX_DATAERR == refused.value.code
        assert b"" == stream.read()


class TestExitCodes:
    def test_relay_down_and_no_drop_directory_is_75_naming_both(self, tmp_path: Path) -> None:
        """Nothing listens and the drop directory is not there (relay never ran with this config):
        EX_TEMPFAIL (75), so cron or PHP may try again, with one line saying both reasons."""
        port = free_port()
        config = tmp_path / "relay.yaml"
        drop = tmp_path / "never-made"
        config.write_text(f"listeners: [{{address: 127.0.0.1, port: {port}}}]\ncompany: {{enabled: false}}\n"
                          f"maildrop_dir: {drop}\n")  # fmt: skip

        done = run_sendmail(["-c", str(config), "a@example.com"], b"Subject: x\n\nx\n")

        assert sendmail.EX_TEMPFAIL == done.returncode
        [line] = done.stderr.decode().splitlines()
        assert line.startswith(f"relay-sendmail: cannot reach relay at 127.0.0.1:{port} (listener of {config}): ")
        assert line.endswith(f"(is relay running?), and the mail cannot be left in its drop directory {drop}: "
                             "No such file or directory; nothing was sent")  # fmt: skip
        assert not drop.exists()

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
    def test_relay_down_and_a_drop_directory_it_may_not_write_is_75_naming_both(self, tmp_path: Path) -> None:
        port = free_port()
        drop = tmp_path / "maildrop"
        drop.mkdir(mode=0o555)
        config = tmp_path / "relay.yaml"
        config.write_text(f"listeners: [{{address: 127.0.0.1, port: {port}}}]\nmaildrop_dir: {drop}\n")

        done = run_sendmail(["-c", str(config), "a@example.com"], b"Subject: x\n\nx\n")

        assert sendmail.EX_TEMPFAIL == done.returncode
        [line] = done.stderr.decode().splitlines()
        assert "(is relay running?), and the mail cannot be left in its drop directory" in line
        assert line.endswith("Permission denied; nothing was sent")
        assert [] == list(drop.iterdir())

    @pytest.mark.parametrize(("args", "says"), [
        (["-Z", "a@example.com"], "option -Z not recognized"),
        (["-i"], "no recipients given (-t reads them from the message)"),
        (["-q30m"], "-q (run the queue) is not supported"),
        (["-bs"], "-bs is not supported"),
    ])  # fmt: skip
    def test_usage_errors_are_64(self, args: list[str], says: str) -> None:
        """Unknown options and a message with nowhere to go: EX_USAGE (64), through the console script."""
        script = Path(sys.executable).with_name("relay-sendmail")
        if not script.exists():
            pytest.skip("relay-sendmail is not installed in this environment (pip install -e .)")

        done = run_sendmail(args, b"Subject: x\n\nx\n", command=[str(script)])

        assert sendmail.EX_USAGE == done.returncode
        assert done.stderr.decode().startswith(f"relay-sendmail: {says}")

    def test_an_unreadable_config_given_explicitly_is_78(self, tmp_path: Path) -> None:
        """``-c`` naming a file that is not there: EX_CONFIG (78), not a silent fallback."""
        done = run_sendmail(["-c", str(tmp_path / "missing.yaml"), "a@example.com"], b"x\n")

        assert sendmail.EX_CONFIG == done.returncode
        assert b"cannot read the config" in done.stderr


def _broken(setup: Setup, under_company: str) -> Path:
    """The command's config with one more line in the company section, as an admin's edit adds it."""
    text = "\n" + setup.config.read_text(encoding="utf-8")
    assert "\ncompany:\n" in text
    path = setup.config.with_name("broken.yaml")
    path.write_text(text.replace("\ncompany:\n", f"\ncompany:\n{under_company}\n")[1:], encoding="utf-8")
    return path


class TestBrokenConfig:
    """Finding 2: the daemon keeps its previous config when relay.yaml is not valid YAML, so this command
    must not refuse mail (exit 78: cron and PHP do not retry) for a mistake outside ``listeners:``."""

    def test_a_yaml_error_elsewhere_delivers_the_mail_and_warns_once(self, setup: Setup) -> None:
        """The tester's edit (an unquoted ': ' in from_name): the listener is read from its own section, the
        mail goes through (exit 0) and one stderr line names the error, relay check and where it went."""
        config = _broken(setup, "  from_name: Test Oy: Laskutus")

        done = run_sendmail(["-c", str(config), "-t", "-oi"], b"To: x@example.com\nSubject: s\n\nok\n")
        [got] = setup.up.wait_for(1)

        assert 0 == done.returncode, done.stderr
        assert ["x@example.com"] == got.rcpt_tos
        [line] = done.stderr.decode().splitlines()
        assert line.startswith(f"relay-sendmail: warning: {config} is not valid YAML (line ")
        assert "the value of from_name contains ': '" in line
        assert f"(relay check {config} says what to fix)" in line
        assert line.endswith(f"the mail was handed to relay at 127.0.0.1:{setup.relay.port} (listener of {config}, "
                             "read from its listeners: section alone)")  # fmt: skip

    def test_the_warning_never_shows_a_secret_line(self, setup: Setup) -> None:
        """The error on a line that may hold a secret: the warning says what to change in words, without the
        line (yamlerrors' rule: it goes to a cron mail or a web server's log)."""
        config = _broken(setup, "  password_file: /etc/relay/secrets/Sala: S3CRETzq9pw")

        done = run_sendmail(["-c", str(config), "-i", "x@example.com"], b"Subject: s\n\nok\n")
        setup.up.wait_for(1)

        assert 0 == done.returncode, done.stderr
        [line] = done.stderr.decode().splitlines()
        assert "relay-sendmail: warning: " in line and "the mail was handed to relay" in line
        assert "S3CRET" not in line and "Sala" not in line

    @pytest.mark.parametrize(("text", "why"), [
        ("listeners:\n  - address: 127.0.0.1\n    port: [1\ncompany: {}\n",
         "the listeners: section is not valid YAML either"),
        ("listeners:\n - {address: 127.0.0.1, port: 1}\n listeners: []\n",
         "listeners: is on more than one line or indented, so which one is meant cannot be told"),
        ("company:\n  from_name: A: B\n", None),
    ])  # fmt: skip
    def test_listeners_that_cannot_be_read_alone_mean_the_default_listener(
        self, tmp_path: Path, text: str, why: str | None
    ) -> None:
        """When the listeners: section is broken too (or absent), the command tries relay's default listener,
        as for a file it cannot read, and says so; it never exits 78 for a YAML error."""
        config = tmp_path / "relay.yaml"
        config.write_text(text, encoding="utf-8")

        listener = sendmail.listener_address(str(config))

        assert sendmail.FALLBACK == listener.address
        assert (listener.warning or "").startswith(f"{config} is not valid YAML (line ")
        expected = f"is not valid YAML and {why})" if why else "has no listeners:)"
        assert listener.note.endswith(f"{config} {expected}"), listener.note

    def test_a_valid_file_is_read_as_before(self, tmp_path: Path) -> None:
        """No warning for a file that is valid YAML (the daemon checks its keys, not this command)."""
        config = tmp_path / "relay.yaml"
        config.write_text("listeners:\n  - {address: '::', port: 02525}\nbogus_key: 1\n", encoding="utf-8")

        listener = sendmail.listener_address(str(config))

        assert (("::1", 2525), None) == (listener.address, listener.warning)


class TestCommandLine:
    @pytest.mark.parametrize(("args", "expected"), [
        (["-t", "-i"], {"extract": True, "dot_ends": False}),
        (["-ti", "-fsender@x.fi"], {"extract": True, "dot_ends": False, "sender": "sender@x.fi"}),
        (["-oi", "-f", "Web Shop <shop@x.fi>", "a@x.fi"], {"dot_ends": False, "sender": "shop@x.fi",
                                                          "recipients": ["a@x.fi"]}),
        (["-F", "Cron Daemon", "-oem", "-odi", "-B8BITMIME", "-bm", "-N", "never", "a@x.fi"],
         {"full_name": "Cron Daemon", "mode": "m", "recipients": ["a@x.fi"]}),
        (["-f", "<>", "--", "-a@x.fi"], {"sender": "", "recipients": ["-a@x.fi"]}),
        (["-C", "/etc/relay/other.yaml", "-bp"], {"config": "/etc/relay/other.yaml", "mode": "p"}),
    ])  # fmt: skip
    def test_sendmail_options(self, args: list[str], expected: dict[str, Any]) -> None:
        """The flags programs pass (bundled or not, values attached or not) and the ignored ones."""
        options = sendmail.parse_args(args)

        assert expected == {key: getattr(options, key) for key in expected}

    @pytest.mark.parametrize(("data", "dot_ends", "expected"), [
        (b"a\nb\n", True, b"a\r\nb\r\n"),
        (b"a\r\nb", True, b"a\r\nb\r\n"),  # CRLF stays CRLF (not CRCRLF); a last line gets its CRLF
        (b"a\n.\nb\n", True, b"a\r\n"),
        (b"a\n.\r\nb\n", True, b"a\r\n"),
        (b".\nb\n", True, b""),
        (b"a\n.", True, b"a\r\n"),
        (b"a\n.\nb\n", False, b"a\r\n.\r\nb\r\n"),
        (b"a\n..\nb\n", True, b"a\r\n..\r\nb\r\n"),  # not a lone dot; smtplib dot-stuffs it on the wire
        (b"\xe4\xff\n", True, b"\xe4\xff\r\n"),
        (b"", True, b""),
    ])  # fmt: skip
    def test_reading_the_message(self, data: bytes, dot_ends: bool, expected: bytes) -> None:
        """Bare LF -> CRLF, 8-bit bytes untouched, and a lone "." ends the input only without -i."""
        assert expected == sendmail.read_message(data, dot_ends=dot_ends)

    def test_t_keeps_every_byte_but_the_bcc_fields(self) -> None:
        """-t removes Bcc (with its continuation lines) and leaves every other byte where it was."""
        message = (b"From sender Mon Jan 1 00:00:00 2024\r\nTo: a@x.fi\r\nBCC: b@x.fi,\r\n\tc@x.fi\r\n"
                   b"Subject: \xe4\r\nCc: d@x.fi\r\n\r\nBcc: not a header\r\n")  # fmt: skip

        kept, found = sendmail.extract_recipients(message)

        assert ["a@x.fi", "b@x.fi", "c@x.fi", "d@x.fi"] == found
        assert (b"From sender Mon Jan 1 00:00:00 2024\r\nTo: a@x.fi\r\nSubject: \xe4\r\nCc: d@x.fi\r\n\r\n"
                b"Bcc: not a header\r\n") == kept  # fmt: skip

    def test_compose_sender_full_name_and_recipients(self) -> None:
        """No -f: the login name at this host; -F adds a From only where there is none; -t adds the header
        recipients to the arguments' (as Postfix does), each once."""
        options = sendmail.parse_args(["-t", "-F", "Cron Daemon", "a@x.fi", "root"])

        sender, recipients, message = sendmail.compose(options, b"To: a@x.fi, b@x.fi\nSubject: x\n\nbody\n")
        with_from = sendmail.compose(options, b"From: me@x.fi\nTo: b@x.fi\n\nbody\n")[2]

        assert sender.endswith(f"@{HOST}") and "@" not in sender.removesuffix(f"@{HOST}")
        assert ["a@x.fi", f"root@{HOST}", "b@x.fi"] == recipients
        assert message.startswith(f'From: Cron Daemon <{sender}>\r\nTo: a@x.fi, b@x.fi\r\n'.encode())
        assert b"From: me@x.fi\r\nTo: b@x.fi\r\n\r\nbody\r\n" == with_from


SENDMAIL = [sys.executable, "-m", "relay.commands.sendmail"]  # the command alone: no start-up cost of the relay CLI


def _spooled(setup: Setup) -> list[str]:
    """Every entry in every spool state: what the daemon queued."""
    spool = setup.config.parent / "spool"
    states = ("incoming", "active", "deferred", "failed", "hold")
    return [e.id for state in states for e in queue_entries(spool, state)]


class TestIssue16RecipientLists:
    """Issue 16, 1.1: every argument (and with -t every To/Cc/Bcc field) is an address list, and bare
    addresses separated by whitespace are that many recipients, as Postfix's sendmail takes them."""

    @pytest.mark.parametrize(("args", "headers", "expected"), [
        (["foo bar"], b"", [f"foo@{HOST}", f"bar@{HOST}"]),
        (["sa1@example.com sa2@example.com"], b"", ["sa1@example.com", "sa2@example.com"]),
        (["-t"], b"To: ss1@example.com ss2@example.com\n", ["ss1@example.com", "ss2@example.com"]),
        (["-t"], b"To: a@example.com; B <b@example.com>\nCc: team: c@example.com, d@example.com;\n",
         ["a@example.com", "b@example.com", "c@example.com", "d@example.com"]),
        (["a@example.com;b@example.com", "Cron Daemon <root>, \"Virtanen, Matti\" <m@example.com>"], b"",
         ["a@example.com", "b@example.com", f"root@{HOST}", "m@example.com"]),
        # the surname of an unquoted "Last, First <addr>" was a recipient of its own (Virtanen@host)
        (["-t"], b"To: Virtanen, Matti <vm@example.com>; b@example.com\n", ["vm@example.com", "b@example.com"]),
    ], ids=["two bare names", "two bare addresses", "-t two bare addresses", "-t ; list and a group", "lists",
            "-t an unquoted name with a comma"])  # fmt: skip
    def test_every_member_is_a_recipient(
        self, setup: Setup, args: list[str], headers: bytes, expected: list[str]
    ) -> None:
        """No recipient dropped, none invented (``@example.com``): each reaches the provider's envelope."""
        data = headers + b"Subject: x\n\nbody\n"
        done = run_sendmail(["-c", str(setup.config), "-i", *args], data, command=SENDMAIL)
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        assert expected == got.rcpt_tos
        if "-t" in args:  # and the provider's reader sees them all in To/Cc, not an empty To
            shown = [a.addr_spec for name in ("To", "Cc") for a in getattr(got.message[name], "addresses", ())]
            assert expected == shown

    @pytest.mark.parametrize(("args", "headers", "code", "named"), [
        (["ok@example.com, b@"], b"", sendmail.EX_USAGE, '"b@"'),
        (["ok@example.com", "Matti <m@example.com> extra"], b"", sendmail.EX_USAGE, '"Matti <m@example.com> extra"'),
        (["-t"], b"To: ok@example.com <other@example.com>\n", sendmail.EX_DATAERR, '"ok@example.com <other@example.com>"'),
        (["-t", "ok@example.com"], b"Cc: a@example.com @example.com\n", sendmail.EX_DATAERR, '"@example.com"'),
    ], ids=["bad member", "text after an address", "-t two addresses in one member", "-t missing local part"])  # fmt: skip
    def test_a_member_that_is_not_an_address_refuses_the_whole_command(
        self, setup: Setup, args: list[str], headers: bytes, code: int, named: str
    ) -> None:
        """64 for an argument, 65 for a header field: one line naming the member, nothing queued or sent."""
        data = headers + b"Subject: x\n\nbody\n"
        done = run_sendmail(["-c", str(setup.config), "-i", *args], data, command=SENDMAIL)

        assert code == done.returncode
        [line] = done.stderr.decode().splitlines()
        assert line.startswith(f"relay-sendmail: recipient {named} is not an address (in the ")
        assert line.endswith('"); nothing was sent') and "\\r" not in line
        assert [] == _spooled(setup)
        assert [] == setup.up.received


@dataclass
class Member:
    """One member of a generated address list: its text, the addresses it names, and for a bad one
    what the refusal must name."""

    text: str
    addresses: list[str]
    bad: str | None = None
    delivered: list[str] | None = None  # what the provider gets, when the daemon rewrites it (a phone number)


_LOCAL = st.from_regex(r"[a-z0-9]{1,8}([._+-][a-z0-9]{1,6}){0,2}", fullmatch=True)
_DOMAIN = st.sampled_from(["example.com", "x.fi", "Mail.Example", "a-b.example.com"])
_ADDRESS = st.builds("{}@{}".format, _LOCAL, _DOMAIN)
_NAME = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)  # a bare local part: qualified with this host
_DISPLAY = st.sampled_from(
    ["Matti", "Matti Meikäläinen", '"Virtanen, Matti"', '"a@b.fi, c; d"', "=?utf-8?q?M=C3=A4tti?="]
)
_BAD = ["b@", "@example.com", "a@@example.com", "<a@example.com", "a@example.com>", "Matti <m@example.com> extra",
        "x <a@>", "a..b@example.com", "a@example.com <b@example.com>", "<>", "(comment <a@example.com>"]  # fmt: skip


_BAD_WORDS = ["b@", "@x.fi", "a@@x.fi", "a..b@x.fi"]


@st.composite
def _bare(draw: st.DrawFn) -> Member:
    """Bare addresses and names separated by whitespace: each one a recipient."""
    words = draw(st.lists(st.one_of(_ADDRESS, _NAME), min_size=1, max_size=3))
    return Member("".join(w + draw(st.sampled_from([" ", "  ", "\t"])) for w in words).strip(), words)


# phone numbers as typed, and as the daemon compacts them
_PHONES = st.sampled_from([("040 123 4567", "0401234567"), ("(09) 123-4567", "091234567"),
                           ("+358 (0)40 123 4567", "+358401234567"), ("050-765 4321", "0507654321"),
                           ("(09)1234567", "091234567")])  # fmt: skip


def _phone(typed: tuple[str, str], domain: str) -> Member:
    return Member(f"{typed[0]}@{domain}", [f"{typed[0]}@{domain}"], delivered=[f"{typed[1]}@{domain}"])


members = st.one_of(
    _bare(),
    st.builds(_phone, _PHONES, _DOMAIN),
    st.builds(lambda d, a: Member(f"{d} <{a}>", [a]), _DISPLAY, st.one_of(_ADDRESS, _NAME)),
    st.builds(lambda a: Member(f"<{a}>", [a]), _ADDRESS),
    st.builds(lambda a: Member(f"{a} (Matti, laskutus)", [a]), _ADDRESS),
    st.builds(lambda g: Member(f"tiimi: {', '.join(g)};", g), st.lists(_ADDRESS, max_size=3)),
    st.builds(lambda b: Member(b, [], bad=b), st.sampled_from(_BAD)),
    st.builds(lambda a, b: Member(f"{a} {b}", [], bad=b), _ADDRESS, st.sampled_from(_BAD_WORDS)),
)


@st.composite
def argument_lists(draw: st.DrawFn) -> tuple[list[str], list[Member]]:
    """Members joined by ``,`` / ``;`` separators, cut into one to three arguments (or fields)."""
    given = draw(st.lists(members, min_size=1, max_size=6))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(given) - 1)), max_size=2, unique=True)))
    chunks = [given[a:b] for a, b in zip([0, *cuts], [*cuts, len(given)]) if given[a:b]]
    separators = st.sampled_from([",", ", ", ";", "; ", " , "])
    values = ["".join(m.text + (draw(separators) if i < len(c) - 1 else "") for i, m in enumerate(c)) for c in chunks]
    return values, given


@settings(max_examples=int(os.environ.get("RELAY_PROPERTY_EXAMPLES", "300")), deadline=None)
@given(case=argument_lists())
def test_property_address_lists_name_every_address_or_the_bad_member(
    case: tuple[list[str], list[Member]],
) -> None:
    """Issue 16, 1.1, in-process: the parser returns every address given, in order, or refuses naming a
    bad member; it never drops one or makes one up."""
    values, given = case
    bad = [m.bad for m in given if m.bad]
    try:
        found = [a for value in values for a in sendmail.address_list(value)]
    except sendmail.BadAddress as refused:
        assert any(text in refused.member for text in bad), refused.member  # an unclosed < takes the rest along
        return
    assert [] == bad
    assert [a for m in given for a in m.addresses] == found


_subjects = count()


@settings(max_examples=int(os.environ.get("RELAY_SENDMAIL_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(case=argument_lists(), extract=st.booleans())
def test_property_every_address_is_delivered_or_the_command_fails_naming_it(
    setup: Setup, case: tuple[list[str], list[Member]], extract: bool
) -> None:
    """Issue 16, 1.1, through the real command and the daemon (one relay for all examples): each address
    given as arguments (or in To/Cc/Bcc with -t) is in the provider's envelope, and nothing else is; or
    a bad member refuses the command (64 / 65) naming it, and nothing is sent."""
    values, given = case
    subject = f"property {next(_subjects)}"
    fields = "".join(f"{name}: {v}\n" for name, v in zip(["To", "Cc", "Bcc"], values)) if extract else ""
    before = len(setup.up.received)

    done = run_sendmail(["-c", str(setup.config), "-i", *(["-t"] if extract else ["--", *values])],
                        f"{fields}Subject: {subject}\n\nbody\n".encode(), command=SENDMAIL)  # fmt: skip

    stderr = done.stderr.decode()
    sent = [a for m in given for a in (m.addresses if m.delivered is None else m.delivered)]
    wanted = {(a if "@" in a else f"{a}@{HOST}").lower() for a in sent}
    if any(m.bad for m in given):
        assert (sendmail.EX_DATAERR if extract else sendmail.EX_USAGE) == done.returncode, stderr
        [line] = stderr.splitlines()
        assert line.startswith("relay-sendmail: recipient "), line
        assert any(m.bad in line for m in given if m.bad), line
        assert before == len(setup.up.received)
    elif not wanted:
        assert (sendmail.EX_USAGE, True) == (done.returncode, "no recipients given" in stderr)
    else:
        assert (0, "") == (done.returncode, stderr)
        [got] = [r for r in setup.up.wait_for(before + 1) if r.message["Subject"] == subject]
        assert sorted(wanted) == sorted(a.lower() for a in got.rcpt_tos)


class TestPhoneNumbers:
    """A phone number typed as people type it (``040 123 4567@sms``) is one SMS recipient, as the daemon
    takes it in one RCPT; the whitespace rule (``'foo bar'`` is two recipients) is for other words."""

    @pytest.mark.parametrize(("args", "headers", "sms", "mail"), [
        (["040 123 4567@sms"], b"", ["+358401234567@gw.example"], []),
        (["-t"], b"To: 040 123 4567@sms; a@example.com\n", ["+358401234567@gw.example"], ["a@example.com"]),
        (["(09) 123-4567@sms", "a@example.com"], b"", ["+35891234567@gw.example"], ["a@example.com"]),
        (["+358 (0)40 123 4567@sms, b@example.com c@example.com"], b"", ["+358401234567@gw.example"],
         ["b@example.com", "c@example.com"]),
        (["-t"], b"To: Matti <040 123 4567@sms>\nCc: root 050 765-4321@sms\n",
         ["+358401234567@gw.example", "+358507654321@gw.example"], [f"root@{HOST}"]),
    ], ids=["argument", "-t ; list", "area code in brackets", "+358 (0) and bare words", "-t angle and bare"])  # fmt: skip
    def test_a_number_with_spaces_or_brackets_is_one_sms(
        self, sms_setup: Setup, args: list[str], headers: bytes, sms: list[str], mail: list[str]
    ) -> None:
        """The number reaches the gateway whole; no mail to ``040@host`` or ``123@host``, and no area
        code lost to the RFC 5322 parser, which reads ``(09)`` as a comment."""
        done = run_sendmail(["-c", str(sms_setup.config), "-i", "-f", "matti@erp.local", *args],
                            headers + b"Subject: Muistutus\n\nHuomenna klo 8\n", command=SENDMAIL)  # fmt: skip
        got = sms_setup.up.wait_for(bool(sms) + bool(mail))  # one gateway message for all numbers, one mail

        assert (0, b"") == (done.returncode, done.stderr)
        assert sorted(sms) == sorted(r for m in got for r in m.rcpt_tos if r.endswith("@gw.example"))
        assert mail == [r for m in got for r in m.rcpt_tos if not r.endswith("@gw.example")]

    @pytest.mark.parametrize(("args", "headers", "code", "named"), [
        (["040 +358 40@sms"], b"", sendmail.EX_USAGE, '"040 +358 40@sms"'),
        (["-t"], b"To: a@example.com, 040 123 4567@sms 050\n", sendmail.EX_DATAERR, '"040 123 4567@sms 050"'),
    ], ids=["two numbers or one", "-t digits after the number"])  # fmt: skip
    def test_a_number_run_that_could_be_read_two_ways_refuses_the_command(
        self, sms_setup: Setup, args: list[str], headers: bytes, code: int, named: str
    ) -> None:
        """Digits beside a number (a number cut in two? a second number without its domain?): the
        command is refused naming the member as typed, and nothing is queued or sent."""
        done = run_sendmail(["-c", str(sms_setup.config), "-i", *args], headers + b"Subject: x\n\nx\n",
                            command=SENDMAIL)  # fmt: skip

        assert code == done.returncode
        [line] = done.stderr.decode().splitlines()
        assert line.startswith(f"relay-sendmail: recipient {named} is not an address (in the ")
        assert [] == _spooled(sms_setup)
        assert [] == sms_setup.up.received


LATIN1_NAME = os.fsdecode("P\xe4ivi Ty\xf6ntekij\xe4".encode("latin-1"))  # as argv holds a legacy program's bytes


class TestLegacyArguments:
    """A program in a Latin-1 locale passes Latin-1 bytes in its arguments; Python keeps the bytes that
    are not UTF-8 as surrogate escapes, which no encoder takes."""

    def test_a_latin1_full_name_is_the_from_name(self, setup: Setup) -> None:
        """``-F`` in Latin-1: the From the command writes (kept by the daemon as the Reply-To) carries
        the name, RFC 2047 encoded, not exit 70."""
        done = run_sendmail(["-c", str(setup.config), "-t", "-i", "-F", LATIN1_NAME, "-f", "someone@example.org"],
                            b"To: a@example.com\nSubject: x\n\nbody\n", command=SENDMAIL)  # fmt: skip
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        assert "Päivi Työntekijä" == got.message["Reply-To"].addresses[0].display_name
        assert "someone@example.org" == got.message["Reply-To"].addresses[0].addr_spec
        assert got.content.split(b"\r\n\r\n")[0].isascii()

    def test_a_latin1_sender_is_sent_as_utf8(self, setup: Setup) -> None:
        """``-f`` in Latin-1 is read as Windows-1252 and sent with SMTPUTF8, which relay offers."""
        sender = os.fsdecode("m\xe4tti@example.org".encode("latin-1"))

        done = run_sendmail(["-c", str(setup.config), "-i", "-f", sender, "a@example.com"], b"Subject: x\n\nbody\n",
                            command=SENDMAIL)  # fmt: skip
        [got] = setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        assert ["a@example.com"] == got.rcpt_tos

    def test_a_latin1_recipient_is_taken_as_utf8(self, setup: Setup) -> None:
        """A recipient argument in Latin-1 is the address a UTF-8 program would have named; relay takes it
        (the test provider offers no SMTPUTF8, so relay fails it later with a notice: not this test's)."""
        done = run_sendmail(["-c", str(setup.config), "-i", os.fsdecode("j\xf6rgen@example.com".encode("latin-1"))],
                            b"Subject: x\n\nbody\n", command=SENDMAIL)  # fmt: skip
        setup.up.wait_for(1)

        assert (0, b"") == (done.returncode, done.stderr)
        spool = setup.config.parent / "spool"
        mail = [e for state in ("incoming", "active", "deferred", "failed") for e in queue_entries(spool, state)
                if e.kind == "mail"]  # fmt: skip
        assert [("jörgen@example.com",)] == [e.recipients for e in mail]


class TestHelp:
    @pytest.mark.parametrize("command", [[sys.executable, "-m", "relay", "sendmail"], SENDMAIL],
                             ids=["relay sendmail", "relay-sendmail"])  # fmt: skip
    def test_help_prints_the_usage_and_exits_0(self, command: list[str]) -> None:
        """A person typing ``--help`` gets the usage on stdout, not "not recognized" and exit 64."""
        done = run_sendmail(["--help"], command=command)

        assert (0, b"") == (done.returncode, done.stderr)
        assert done.stdout.decode().startswith("usage: relay-sendmail ")
        assert b"-t " in done.stdout and b"Exit codes" in done.stdout
