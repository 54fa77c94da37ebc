"""The drop directory's pickup (``relay/intake/pickup.py``): files relay-sendmail left while relay was down,
taken through the listener's path by a running relay; what it cannot take goes to ``bad/``, never away."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay import maildrop
from relay.commands.cli import main
from relay.queue.spool import Spool
from tests.conftest import UpstreamFactory, build_config
from tests.servers import RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]


def _relay(upstream: UpstreamFactory, relay_with: RelayFactory, **extra: Any) -> tuple[Upstream, RelayRunner]:
    up = upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "pw"})
    relay = relay_with(
        upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
        company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
        users={"matti": {"addresses": ["matti@erp.local"], "from_address": "matti@rakennus.fi"}},
        **extra,
    )
    return up, relay


def _drop(directory: Path, sender: str, body: bytes = b"Subject: jonossa\r\n\r\nodotti\r\n") -> Path:
    return maildrop.write(directory, maildrop.Drop(sender, ("asiakas@example.com",), body, time=time.time()))


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_bad_files_go_to_bad_with_an_error_event_and_the_others_are_still_taken(
    upstream: UpstreamFactory, relay_with: RelayFactory
) -> None:
    """Not JSON, cut short, a symlink, a foreign name, a message relay refuses for good (5xx): each moved
    to ``bad/`` with a ``maildrop_bad`` event saying why; the good file beside them is delivered."""
    up, relay = _relay(upstream, relay_with, identify={"order": ["envelope_sender"], "unknown": "reject"})
    directory = relay.config.maildrop
    elsewhere = directory.parent / "secret.txt"
    elsewhere.write_bytes(b'{"version":1}\n')
    bad_names = {
        maildrop.new_name(): b"this is not a drop file\n",
        maildrop.new_name(): b'{"version":1,"sender":"a@x.fi","recipients":["b@y.fi"],"size":500}\nSubject: cut\r\n',
    }
    with capture_logs() as logs:
        for name, data in bad_names.items():
            (directory / name).write_bytes(data)
        link = directory / maildrop.new_name()
        link.symlink_to(elsewhere)
        (directory / "junk").write_bytes(b"x")
        refused = _drop(directory, "stranger@example.com")  # identify.unknown: reject -> 550
        good = _drop(directory, "matti@erp.local")

        [got] = up.wait_for(1)
        _wait(lambda: sorted(p.name for p in directory.iterdir()) == ["bad"])
        _wait(lambda: len([e for e in logs if e["event"] == "maildrop_bad"]) == 5)

    assert "matti@rakennus.fi" == got.mail_from and ["asiakas@example.com"] == got.rcpt_tos
    assert {*bad_names, link.name, "junk", refused.name} == {p.name for p in (directory / "bad").iterdir()}
    assert (directory / "bad" / link.name).is_symlink() and b'{"version":1}\n' == elsewhere.read_bytes()
    reasons = {e["file"]: e["reason"] for e in logs if e["event"] == "maildrop_bad"}
    assert "the envelope line is not JSON" == reasons[next(iter(bad_names))]
    assert "the message is 14 octets, the envelope says 500 (cut short?)" == reasons[list(bad_names)[1]]
    assert "a symbolic link" == reasons[link.name]
    assert "not a file relay-sendmail wrote (its name)" == reasons["junk"]
    assert reasons[refused.name].startswith("refused: 550 ")
    assert all(e["log_level"] == "error" for e in logs if e["event"] == "maildrop_bad")
    [received] = [e for e in logs if e["event"] == "received"]
    assert (good.name, "maildrop") == (received["maildrop_file"], received["via"])


def test_a_file_refused_for_now_stays_for_the_next_round(upstream: UpstreamFactory, relay_with: RelayFactory) -> None:
    """A 4xx (here the user's sending rate, 1 a minute) leaves the file where it is, with a warning: it is
    tried again later, not moved and not lost."""
    up, relay = _relay(upstream, relay_with, limits={"messages_per_minute_per_user": 1})
    directory = relay.config.maildrop
    with capture_logs() as logs:
        first = _drop(directory, "matti@erp.local")
        second = _drop(directory, "matti@erp.local")
        up.wait_for(1)
        _wait(lambda: any(e["event"] == "maildrop_deferred" for e in logs))

    assert not first.exists() and second.exists()
    [deferred] = [e for e in logs if e["event"] == "maildrop_deferred"]
    assert (second.name, 5.0) == (deferred["file"], deferred["retry_in"])
    assert deferred["reply"].startswith("450 4.7.1")
    assert [] == list((directory / "bad").iterdir())


def test_more_recipients_than_one_transaction_takes_all_get_it(upstream: UpstreamFactory, relay_with: RelayFactory) -> None:
    """limits.max_recipients bounds one SMTP transaction (a client sends the rest in another): a drop file
    with more went whole to bad/ and reached nobody, while relay-sendmail had said exit 0."""
    up, relay = _relay(upstream, relay_with, limits={"max_recipients": 3})
    many = tuple(f"asiakas{n}@example.com" for n in range(5))
    drop = maildrop.write(relay.config.maildrop, maildrop.Drop("matti@erp.local", many, b"Subject: s\r\n\r\nx\r\n",
                                                               time=time.time()))  # fmt: skip
    got = up.wait_for(2)  # in two parts, as an SMTP client over the limit sends it
    _wait(lambda: not drop.exists())

    assert sorted(many) == sorted(r for message in got for r in message.rcpt_tos)
    assert [] == list((relay.config.maildrop / "bad").glob("*"))


def test_a_phone_number_typed_with_spaces_goes_as_an_sms(upstream: UpstreamFactory, relay_with: RelayFactory) -> None:
    """A tester's find: relay-sendmail, relay down, 'cust@x; 040 123 4567@sms'. The drop file keeps the number
    as typed, and the pickup checked it so, without the compaction an RCPT gets: the e-mail went, the SMS
    was refused (after exit 0), and a file with only the number went to bad/."""
    up, relay = _relay(upstream, relay_with, sms={"gateway": "sms-{number}@gw.example", "domain": "sms"})
    both = maildrop.write(relay.config.maildrop, maildrop.Drop(
        "matti@erp.local", ("asiakas@example.com; (09) 123-4567@sms",), b"Subject: s\r\n\r\nx\r\n", time=time.time()))
    alone = maildrop.write(relay.config.maildrop, maildrop.Drop(
        "matti@erp.local", ("040 123 4567@sms",), b"Subject: t\r\n\r\ny\r\n", time=time.time()))  # fmt: skip
    got = up.wait_for(3)
    _wait(lambda: not both.exists() and not alone.exists())

    sent = sorted(r for message in got for r in message.rcpt_tos)
    assert 3 == len(sent) and "asiakas@example.com" in sent, sent
    assert 2 == len([r for r in sent if r.startswith("sms-+358") and r.endswith("@gw.example")]), sent
    assert [] == list((relay.config.maildrop / "bad").glob("*"))


def test_the_packages_drop_directory_is_taken_too_when_the_config_names_another(
    upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who cannot read relay.yaml (PHP as www-data) leaves mail in the package's directory, since it
    cannot know the spool_dir the admin set: a daemon owning that directory takes it from there as well
    (it looked only in <spool_dir>/maildrop, and the mail, with exit 0, was never sent)."""
    packaged = tmp_path / "var-spool-relay" / "maildrop"
    packaged.mkdir(parents=True)
    monkeypatch.setattr(maildrop, "PACKAGED_MAILDROP", packaged)
    up, relay = _relay(upstream, relay_with)
    assert packaged != relay.config.maildrop
    drop = _drop(packaged, "matti@erp.local")

    [got] = up.wait_for(1)
    _wait(lambda: not drop.exists())

    assert "matti@rakennus.fi" == got.mail_from


@pytest.mark.parametrize("damage", [
    lambda data: data[:-1],
    lambda data: b"\n" + data,
    lambda data: data.replace(b'"recipients":["b@y.fi"]', b'"recipients":[]'),
    lambda data: data.replace(b'"version":1', b'"version":2'),
])  # fmt: skip
def test_decode_refuses_what_relay_sendmail_did_not_write(damage: Callable[[bytes], bytes]) -> None:
    data = maildrop.encode(maildrop.Drop("a@x.fi", ("b@y.fi",), b"Subject: x\r\n\r\nx\r\n", uid=os.getuid()))
    assert "a@x.fi" == maildrop.decode(data).sender
    with pytest.raises(maildrop.BadDrop):
        maildrop.decode(damage(data))


def test_relay_queue_counts_the_mail_waiting_in_the_drop_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, path = build_config(tmp_path, upstreams={"provider": {"host": "smtp.example.com", "port": 587,
                                "username": "a@x.fi", "password_file": str(tmp_path / "pw")}},
                                company={"from_address": "a@x.fi", "upstream": "provider"})  # fmt: skip
    Spool(config.spool_dir).setup()
    maildrop.setup(config.maildrop)
    _drop(config.maildrop, "matti@erp.local")
    name = _drop(config.maildrop, "matti@erp.local").name
    (config.maildrop / maildrop.BAD / "junk").write_bytes(b"x")
    # a directory someone planted under a drop file's name is no mail (and relay may not move it to bad/)
    planted = name[:-3] + ("eee" if name.endswith("fff") else "fff")
    (config.maildrop / planted).mkdir()
    assert maildrop.is_drop_name(planted)

    assert 0 == main(["queue", "-c", str(path)])

    lines = capsys.readouterr().out.splitlines()
    assert "-- 0 message(s) in queue" == lines[-2]
    assert (f"-- 2 message(s) in the drop directory {config.maildrop}, left by relay-sendmail while relay was down "
            f"(relay takes them when it runs); 1 it could not take in {config.maildrop / 'bad'} (see the "
            "maildrop_bad events)") == lines[-1]  # fmt: skip
