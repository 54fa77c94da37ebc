"""``relay check`` on mistakes an admin made on the first day (a black-box tester's findings): values that
passed and broke mail or the daemon later, and errors worded in Python's terms instead of the file's.

Each test writes a real file and runs ``relay check`` through ``cli.main``, as the admin does; the texts are
written out so that the line numbers asserted are the lines shown (line 1 is the first line of ``base``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from relay.commands import cli
from relay.commands.sendmail import drop_place
from relay.commands.sendtest import COMPANY_USER
from relay.config.load import lenient_spool_dir, load_config, parse_config
from relay.config.warnings import RESERVED_USER
from relay.prepare.settings import resolve


def base(folder: Path) -> str:
    """A valid file that ``relay check`` passes with no warning (17 lines; ``test_spaces_around_a_host_are_dropped``
    sees it pass)."""
    return f"""\
listeners:
  - {{address: 127.0.0.1, port: 2525}}
spool_dir: {folder}/spool
secret_store: {folder}/store
upstreams:
  main:
    host: smtp.example.fi
    username: invoices@demo.example
    password_file: {folder}/pw
company:
  upstream: main
  from_address: invoices@demo.example
  from_name: Demo Oy
users:
  anna:
    addresses: anna@erp.local
    from_name: Anna
"""


Check = Callable[..., tuple[int, str, str]]


@pytest.fixture
def check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Check:
    """``check(text, *options)`` -> (exit code, stdout, stderr) of ``relay check`` on ``text`` as relay.yaml,
    with the password file of ``base`` in place (mode 0600)."""
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o600)

    def run(text: str, *options: str) -> tuple[int, str, str]:
        path = tmp_path / "relay.yaml"
        path.write_text(text, encoding="utf-8")
        capsys.readouterr()
        code = cli.main(["check", *options, str(path)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# region #### control characters in header values ####


@pytest.mark.parametrize(("written", "shown"), [
    ("\\e", "\\x1b (ESC)"), ("\\x1b", "\\x1b (ESC)"), ("\\v", "\\x0b (vertical tab)"), ("\\f", "\\x0c (form feed)"),
    ("\\x7f", "\\x7f (DEL)"), ("\\x01", "\\x01"),
])  # fmt: skip
def test_a_control_character_in_from_name_is_refused(check: Check, tmp_path: Path, written: str, shown: str) -> None:
    """The header folder encoded name and address together as one encoded word: a From with no address."""
    text = base(tmp_path).replace("    from_name: Anna\n", f'    from_name: "Anna{written}Smith"\n')

    code, _, err = check(text)

    assert 1 == code
    assert (f"error: users.anna.from_name: contains the control character {shown}, which cannot be in a mail "
            f"header: remove it (many editors do not show it) ({tmp_path}/relay.yaml:17)") in err  # fmt: skip


@pytest.mark.parametrize(("old", "new", "key", "line"), [
    ("  from_name: Demo Oy\n", '  from_name: "Demo\\eOy"\n', "company.from_name", 13),
    ("  from_address: invoices@demo.example\n", '  from_address: "invoices\\x7f@demo.example"\n',
     "company.from_address", 12),
    ("  from_name: Demo Oy\n", '  from_name: Demo Oy\n  reply_to: "office\\e@demo.example"\n', "company.reply_to", 14),
    ("    addresses: anna@erp.local\n", '    addresses: ["anna@erp.local", "an\\x1bna@erp.local"]\n',
     "users.anna.addresses", 16),
    ("  from_name: Demo Oy\n", '  from_name: Demo Oy\n  copy_to: "copy\\e@demo.example"\n', "company.copy_to", 14),
    ("    username: invoices@demo.example\n", '    username: "invoices@demo.example\\f"\n',
     "upstreams.main.username", 8),
    ("spool_dir:", 'hostname: "relay\\e.demo.example"\nspool_dir:', "hostname", 3),
])  # fmt: skip
def test_every_header_value_refuses_control_characters(
    check: Check, tmp_path: Path, old: str, new: str, key: str, line: int
) -> None:
    """Addresses and every other value that reaches a header or an SMTP command, each at its own line."""
    code, _, err = check(base(tmp_path).replace(old, new, 1))

    assert 1 == code
    assert f"error: {key}: contains the control character \\x" in err
    assert f"({tmp_path}/relay.yaml:{line})" in err


def test_a_tab_in_from_name_is_still_allowed(check: Check, tmp_path: Path) -> None:
    """TAB is folding white space, which a header may hold (and which is encoded correctly); ESC is not."""
    tab = base(tmp_path).replace("    from_name: Anna\n", '    from_name: "Anna\\tSmith"\n')
    escape = base(tmp_path).replace("    from_name: Anna\n", '    from_name: "Anna\\eSmith"\n')

    assert (0, 1) == (check(tab)[0], check(escape)[0])
    assert "Anna\tSmith" == parse_config(tab).users["anna"].from_name


# endregion
# region #### listeners ####


def _listeners(tmp_path: Path, *entries: str) -> str:
    listed = "".join(f"  - {{{entry}}}\n" for entry in entries)
    return base(tmp_path).replace("  - {address: 127.0.0.1, port: 2525}\n", listed)


def test_two_listeners_on_one_address_and_port(check: Check, tmp_path: Path) -> None:
    """``relay check`` said OK, and ``relay serve`` died with a traceback from the intake process."""
    text = _listeners(tmp_path, "address: 127.0.0.1, port: 2525", "address: 127.0.0.1, port: 2526",
                      "address: 127.0.0.1, port: 2525")  # fmt: skip

    code, out, err = check(text)

    assert 1 == code
    assert (f"error: listeners[2]: 127.0.0.1:2525 is also listeners[0]: two listeners cannot listen on one address "
            f"and port (relay would not start): remove one or change its port ({tmp_path}/relay.yaml:4)") in err
    assert f"relay: {tmp_path}/relay.yaml: 1 error(s):" in err and out == ""


def test_the_default_port_counts_too(check: Check, tmp_path: Path) -> None:
    """A listener without a port is on 2525, like one that says so."""
    code, _, err = check(_listeners(tmp_path, "address: 127.0.0.1", "port: 2525"))

    assert 1 == code
    assert "error: listeners[1]: 127.0.0.1:2525 is also listeners[0]" in err and "relay.yaml:3)" in err


def test_a_wildcard_address_overlaps_one_of_its_family(check: Check, tmp_path: Path) -> None:
    """0.0.0.0 takes the port on every IPv4 address and :: on every IPv6 one; relay's IPv6 sockets are
    IPv6-only, so :: and an IPv4 address on one port do not clash (and port 0 is a new free port each time)."""
    anywhere = "allowed_networks: [127.0.0.0/8, '::1']"
    text = _listeners(tmp_path, "address: 127.0.0.1, port: 2525", f"address: 0.0.0.0, port: 2525, {anywhere}",
                      f"address: '::', port: 2525, {anywhere}", "address: '::1', port: 2526",
                      f"address: '::', port: 2526, {anywhere}", "address: 127.0.0.1, port: 0",
                      "address: 127.0.0.1, port: 0")  # fmt: skip

    code, _, err = check(text)

    assert 1 == code
    assert [line for line in err.splitlines() if "error: listeners" in line] == [
        (f"  error: listeners[1]: 0.0.0.0:2525 overlaps listeners[0] (127.0.0.1:2525): 0.0.0.0 means every IPv4 "
         f"address, so both would listen on 127.0.0.1:2525 (relay would not start): remove one or change its port "
         f"({tmp_path}/relay.yaml:3)"),
        (f"  error: listeners[4]: [::]:2526 overlaps listeners[3] ([::1]:2526): :: means every IPv6 address, so both "
         f"would listen on [::1]:2526 (relay would not start): remove one or change its port "
         f"({tmp_path}/relay.yaml:6)"),
    ]  # fmt: skip


# endregion
# region #### values accepted but wrong ####


def test_a_port_written_after_the_host(check: Check, tmp_path: Path) -> None:
    """relay looked the whole text up as a host name, and every delivery failed."""
    code, _, err = check(base(tmp_path).replace("host: smtp.example.fi", "host: smtp.office365.com:587"))

    assert 1 == code
    assert ("error: upstreams.main.host: the port goes in its own key, not after the host: write  host: "
            f"smtp.office365.com  and  port: 587 ({tmp_path}/relay.yaml:7)") in err  # fmt: skip


def test_an_ipv6_host_keeps_its_colons(check: Check, tmp_path: Path) -> None:
    """The only host with a colon in it; written in brackets with a port, it gets the same advice."""
    bracketed = base(tmp_path).replace("host: smtp.example.fi", 'host: "[2001:db8::25]:465"')
    plain = base(tmp_path).replace("host: smtp.example.fi", 'host: "2001:db8::25"')

    code, _, err = check(bracketed)

    assert 1 == code and "write  host: 2001:db8::25  and  port: 465" in err
    assert "2001:db8::25" == parse_config(plain).upstreams["main"].host


def test_spaces_around_a_host_are_dropped(check: Check, tmp_path: Path) -> None:
    """A host pasted with a space after it was called 'not a URL'; no host name has a space."""
    text = base(tmp_path).replace("host: smtp.example.fi", 'host: "  smtp.example.fi "')

    code, _, err = check(text)

    assert (0, "") == (code, err)
    assert "smtp.example.fi" == parse_config(text).upstreams["main"].host


@pytest.mark.parametrize(("host", "why"), [
    ("smtp..example.fi", "'smtp..example.fi' is not a valid host name: a dot at the start or two in a row"),
    (".example.fi", "'.example.fi' is not a valid host name"),
    ("x" * 64 + ".example.fi", f"'{'x' * 64}.example.fi' is not a valid host name"),
])  # fmt: skip
def test_a_host_the_resolver_cannot_take(check: Check, tmp_path: Path, host: str, why: str) -> None:
    """Passed ``check``; then every delivery crashed in Python's IDNA codec and the mail went on hold."""
    code, _, err = check(base(tmp_path).replace("host: smtp.example.fi", f"host: {host}"))

    assert 1 == code
    assert f"error: upstreams.main.host: {why}" in err and f"({tmp_path}/relay.yaml:7)" in err


@pytest.mark.parametrize(("name", "error"), [
    ('"erp server"', "'erp server' is not a host name: the name sent in EHLO has no spaces"),
    ("erp..local", "'erp..local' is not a valid host name"),
    ('"[192.0.2.7]"', ""), ("erp.example.fi", ""),
])  # fmt: skip
def test_the_ehlo_name(check: Check, tmp_path: Path, name: str, error: str) -> None:
    """aiosmtplib refuses a name with a space only when it connects: every message of the account was held."""
    text = base(tmp_path).replace("    username: invoices", f"    local_hostname: {name}\n    username: invoices")

    code, _, err = check(text)

    if error:
        assert 1 == code and f"error: upstreams.main.local_hostname: {error}" in err
    else:
        assert (0, "") == (code, err)


@pytest.mark.parametrize(("where", "line", "key", "bound"), [
    ("upstream", "    timeout: 1e308", "upstreams.main.timeout", "3600"),
    ("delivery", "  retry_interval: 99999999999999999999", "delivery.retry_interval", "86400"),
    ("delivery", "  max_queue_lifetime: 999999999999999999999999", "delivery.max_queue_lifetime", "8640000"),
])  # fmt: skip
def test_absurd_durations_are_refused(check: Check, tmp_path: Path, where: str, line: str, key: str,
                                      bound: str) -> None:  # fmt: skip
    """Taken before: ``relay queue`` then said 'next attempt in 100000000000000000000s'."""
    text = base(tmp_path)
    if where == "upstream":
        text = text.replace("    username: invoices", f"{line}\n    username: invoices")
    else:
        text += f"delivery:\n{line}\n"

    code, _, err = check(text)

    assert 1 == code and f"error: {key}:" in err and bound in err


@pytest.mark.parametrize(("charset", "why"), [
    ("klingon", "'klingon' is not a charset Python knows"), ("base64", "'base64' is not a charset Python knows"),
    ("utf-16", "'utf-16' does not read plain ASCII text as ASCII, so it cannot be the charset of 8-bit mail"),
])  # fmt: skip
def test_a_default_charset_python_cannot_use(check: Check, tmp_path: Path, charset: str, why: str) -> None:
    """relay silently decoded undeclared 8-bit text as iso-8859-1 instead (the fallback of an unknown one)."""
    code, _, err = check(base(tmp_path) + f"rewrite:\n  default_charset: {charset}\n")

    assert 1 == code
    assert (f"error: rewrite.default_charset: {why}: use one such as windows-1252 (the default), iso-8859-1, "
            f"iso-8859-15, cp850 or utf-8 ({tmp_path}/relay.yaml:19)") in err  # fmt: skip


def test_a_known_default_charset_passes(check: Check, tmp_path: Path) -> None:
    """Any spelling Python knows (the seeds write cp1252, latin1, ISO-8859-15); klingon is refused."""
    for charset in ("cp1252", "latin1", "ISO-8859-15", "utf-8"):
        assert 0 == check(base(tmp_path) + f"rewrite:\n  default_charset: {charset}\n")[0], charset
    assert 1 == check(base(tmp_path) + "rewrite:\n  default_charset: klingon\n")[0]


def test_a_user_named_company(check: Check, tmp_path: Path) -> None:
    """``relay send-test company`` means the company's defaults; a user of that name takes it over. A
    warning: that user's mail still goes out right, and a daemon that ran with this file must still start."""
    code, out, err = check(base(tmp_path).replace("  anna:\n", "  company:\n"))

    assert 0 == code
    assert (f"warning: users.company: the user id company is the name relay send-test gives the company's defaults: "
            f"relay send-test company would test this user instead; rename the user (e.g. office) "
            f"({tmp_path}/relay.yaml:15)") in err  # fmt: skip
    assert "OK (1 upstream(s), 1 user(s), 1 warning(s))" in out
    assert COMPANY_USER == RESERVED_USER


@pytest.mark.parametrize("options", [(), ("--startup",)])
def test_a_spool_dir_that_is_a_file(check: Check, tmp_path: Path, options: tuple[str, ...]) -> None:
    """Only a warning, and then ``relay serve`` could not start ('Not a directory'): an error, also for the
    unit's ExecStartPre= (``--startup``), as the daemon cannot start whoever runs it."""
    (tmp_path / "spool").write_text("")

    code, out, err = check(base(tmp_path), *options)

    assert 1 == code
    assert (f"error: spool_dir: spool_dir {tmp_path}/spool: exists and is not a directory: relay cannot store mail "
            f"there and will not start ({tmp_path}/relay.yaml:3)") in err  # fmt: skip
    assert "warning" not in err and "NOT OK (1 error(s), 0 warning(s))" in out


@pytest.mark.parametrize(("value", "words"), [
    ("", "no path given: write the file's path after the key, or remove the key"),
    ('""', "no path given: write the file's path after the key, or remove the key"),
])  # fmt: skip
def test_an_empty_password_file(check: Check, tmp_path: Path, value: str, words: str) -> None:
    """Left empty, the account silently had no password, and ``relay send-test`` blamed the provider; an
    empty text became the current directory."""
    text = base(tmp_path).replace(f"password_file: {tmp_path}/pw", f"password_file: {value}".rstrip())

    code, _, err = check(text)

    assert 1 == code
    assert f"error: upstreams.main.password_file: {words} ({tmp_path}/relay.yaml:9)" in err


def test_every_empty_secret_source_is_an_error(check: Check, tmp_path: Path) -> None:
    """A user's own account, a variable's name and an OAuth2 file alike, each at its line."""
    text = base(tmp_path) + """\
  pekka:
    addresses: pekka@erp.local
    upstream:
      username: pekka@demo.example
      password_env: ""
  liisa:
    addresses: liisa@erp.local
    upstream:
      host: smtp.gmail.com
      username: liisa@gmail.com
      auth: oauth2
      oauth2:
        provider: google
        client_id: x
        client_secret_env: X
        refresh_token_file:
"""
    code, _, err = check(text)

    assert 1 == code
    assert (f"error: users.pekka.upstream.password_env: no variable named: write the environment variable's name "
            f"after the key, or remove the key ({tmp_path}/relay.yaml:22)") in err  # fmt: skip
    assert (f"error: users.liisa.upstream.oauth2.refresh_token_file: no path given: write the file's path after the "
            f"key, or remove the key ({tmp_path}/relay.yaml:33)") in err  # fmt: skip


# endregion
# region #### Python's words ####


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("    from_name: Anna\n", "    from_name: Anna\n  bob:\n",
     ("error: users.bob: expected the user's settings (addresses, from_name...) as key: value lines indented under "
      "it, got nothing (the key has no value) ({file}:18)")),
    ("upstreams:\n", "upstreams:\n  spare:\n",
     ("error: upstreams.spare: expected the account's settings (host, port, username...) as key: value lines "
      "indented under it, got nothing (the key has no value) ({file}:6)")),
    ("company:\n  upstream: main\n  from_address: invoices@demo.example\n  from_name: Demo Oy\n", "company: true\n",
     ("error: company: expected the company's settings (upstream, from_address...) as key: value lines indented "
      "under it, got true ({file}:10)")),
])  # fmt: skip
def test_a_section_without_keys_is_said_in_the_files_words(
    check: Check, tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """pydantic said 'Input should be a valid dictionary or instance of UserConfig': a Python class name."""
    text = base(tmp_path).replace(old, new)

    code, _, err = check(text)

    assert 1 == code
    assert expected.format(file=f"{tmp_path}/relay.yaml") in err
    assert "instance of" not in err and "Config" not in err


def test_a_secret_section_written_as_one_value_is_not_echoed(check: Check, tmp_path: Path) -> None:
    """An oauth2: with a value where its keys belong may be a pasted secret: described, not repeated."""
    text = base(tmp_path).replace("    password_file:", "    oauth2: s3cret-app-key\n    password_file:")

    code, _, err = check(text)

    assert 1 == code
    assert (f"error: upstreams.main.oauth2: expected the account's OAuth2 settings (provider, tenant, client_id...) as "
            f"key: value lines indented under it, got a single value ({tmp_path}/relay.yaml:9)") in err  # fmt: skip
    assert "s3cret" not in err


def test_a_password_file_that_is_a_list(check: Check, tmp_path: Path) -> None:
    """pydantic said 'Input is not a valid path for <class 'pathlib.Path'>'."""
    code, _, err = check(base(tmp_path).replace(f"password_file: {tmp_path}/pw", "password_file: [x]"))

    assert 1 == code
    assert (f"error: upstreams.main.password_file: expected a file path such as /etc/relay/secrets/o365, got a list "
            f"({tmp_path}/relay.yaml:9)") in err  # fmt: skip
    assert "class" not in err


def test_a_password_file_that_is_a_directory(check: Check, tmp_path: Path) -> None:
    """Only warnings, 'cannot be read: IsADirectoryError' and 'chmod 600 it', and exit 0, though no user can
    read a directory as a password: an error, as for a file that does not exist."""
    (tmp_path / "secrets").mkdir(mode=0o755)

    code, out, err = check(base(tmp_path).replace(f"password_file: {tmp_path}/pw", f"password_file: {tmp_path}/secrets"))

    assert 1 == code
    assert (f"  error: upstreams.main.password_file: password file {tmp_path}/secrets is a directory: give the path of "
            f"the file in it that holds the secret ({tmp_path}/relay.yaml:9)\n") == err  # fmt: skip
    assert "NOT OK (1 error(s), 0 warning(s))" in out


# endregion


def test_relative_paths_are_taken_from_the_config_files_folder(
    check: Check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``relay check`` run in /etc/relay found ``secrets/pw``; the service, started in /var/lib/relay, did not.
    Now every path is read as the file's reader sees it, from any directory (here: a directory elsewhere)."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("pw\n")
    (tmp_path / "secrets" / "pw").chmod(0o600)
    text = base(tmp_path).replace(f"password_file: {tmp_path}/pw", "password_file: secrets/pw")
    text = text.replace(f"spool_dir: {tmp_path}/spool", "spool_dir: spool")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, _, err = check(text)

    assert (0, "") == (code, err)
    config = load_config(tmp_path / "relay.yaml")
    assert tmp_path / "secrets" / "pw" == config.upstreams["main"].password_file
    assert tmp_path / "spool" == config.spool_dir == lenient_spool_dir(tmp_path / "relay.yaml")
    assert tmp_path / "spool" / "maildrop" == drop_place(str(tmp_path / "relay.yaml"))[0]
    assert Path("/abs/spool") == parse_config(text.replace("spool_dir: spool", "spool_dir: /abs/spool")).spool_dir


@pytest.mark.parametrize(("networks", "said"), [
    ("[0.0.0.0/0]", "0.0.0.0/0 is every address: anyone who can reach 0.0.0.0 port 2525 can send mail"),
    ('["::/0"]', "::/0 is every address"),
    ("[192.168.1.0/24, 8.8.4.0/24]", "8.8.4.0/24 holds public addresses: anyone there can send mail"),
    ("[192.168.1.0/24, 10.0.0.0/8]", ""),
])  # fmt: skip
def test_an_open_relay_is_named(check: Check, tmp_path: Path, networks: str, said: str) -> None:
    """The example says allowed_networks is what keeps relay from being an open relay; 0.0.0.0/0 passed in silence."""
    text = base(tmp_path).replace("  - {address: 127.0.0.1, port: 2525}",
                                  f"  - {{address: 0.0.0.0, port: 2525, allowed_networks: {networks}}}")  # fmt: skip

    code, _, err = check(text)

    assert 0 == code
    if said:
        assert f"warning: listeners[0].allowed_networks: {said}" in err and "(an open relay" in err
        assert f"({tmp_path}/relay.yaml:2)" in err
    else:
        assert "" == err


@pytest.mark.parametrize(("content", "said"), [
    ("", "the password it names is empty: relay would log in with an empty one"),
    ("\n", "the password it names is empty"),
    ("hunter2\nswordfish\n", "the password it names has 2 lines: relay would send them all"),
])  # fmt: skip
def test_a_password_file_left_empty_or_with_two_lines(check: Check, tmp_path: Path, content: str, said: str) -> None:
    """The example's own steps make an empty file first; forgotten, the next step, relay logged in with ''."""
    text = base(tmp_path)
    check(text)  # (the fixture writes the password file; replaced below)
    (tmp_path / "pw").write_text(content)

    code, out, err = check(text)

    assert 0 == code
    assert f"warning: upstreams.main.password_file: {said}" in err
    assert "hunter2" not in out + err and "swordfish" not in out + err  # never the secret itself


def test_a_user_turns_off_the_companys_reply_to_with_an_empty_one(check: Check, tmp_path: Path) -> None:
    """``reply_to: ""`` was refused as 'not an email address'; copy_to: [] and signature: "" already worked so."""
    text = base(tmp_path).replace("  from_name: Demo Oy\n", "  from_name: Demo Oy\n  reply_to: office@demo.example\n")
    text += '    reply_to: ""\n'

    code, _, err = check(text)

    assert (0, "") == (code, err)
    config = parse_config(text)
    assert (None, "office@demo.example") == (resolve(config, "anna", "test").reply_to or None,
                                             resolve(config, None, "test").reply_to)  # fmt: skip
