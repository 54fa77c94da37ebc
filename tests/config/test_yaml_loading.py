"""Reading the admin's YAML: no secret in a syntax hint, YAML 1.2's scalars, hostile files refused in one line,
a file in another encoding, and a value a `` #`` silently cut.

Each case goes through ``relay check`` (``cli.main``, or the installed command where a file could exhaust the
test's own memory before the limits held) or ``load_config``, the function the daemon's SIGHUP calls, with a
real file in ``tmp_path``. Config texts are written out in full so that the lines asserted are the lines shown.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relay.commands import cli
from relay.config.load import load_config
from relay.config.yamlread import SectionUnreadable, read_section
from relay.errors import ConfigError, ConfigProblem
from tests.conftest import UpstreamFactory
from tests.servers import Upstream
from tests.test_daemon import RelayProcess, write_config

SECRET = "S3CRETzq9pw"


def base(tmp_path: Path) -> str:
    """A valid file (9 lines) whose secret file and spool exist, so ``relay check`` passes it: exit 0."""
    secret = tmp_path / "o365.pw"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    return f"""\
spool_dir: {tmp_path / "spool"}
upstreams:
  o365:
    host: smtp.example.com
    port: 587
    username: yritys@yritys.fi
    password_file: {secret}
company:
  upstream: o365
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def check(path: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``relay check PATH``: (exit code, stdout, stderr)."""
    code = cli.main(["check", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def problems(path: Path) -> list[ConfigProblem]:
    """What ``load_config`` (``relay serve`` at start and at SIGHUP) refuses ``path`` with."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def run_limited(*arguments: str) -> subprocess.CompletedProcess[str]:
    """The installed ``relay``, with 1 GB of address space: what escapes the limits dies here of MemoryError
    instead of taking the test machine's memory."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "relay", *arguments], capture_output=True, text=True, timeout=120,
                          check=False, preexec_fn=limit)  # fmt: skip


# region #### a syntax hint never shows a secret ####


class TestSecretsStayOutOfHints:
    @pytest.mark.parametrize(
        ("line", "advice"),
        [
            pytest.param(f"    password: {SECRET}: x", "the value of password contains ': ', which YAML reads as "
                         "another key: put the value in quotes", id="colon-in-value"),
            pytest.param(f'    password: ab"{SECRET}" x: y', "put the value in quotes", id="quote-and-colon"),
            pytest.param(f"    password {SECRET}", "put ': ' right after password", id="no-colon"),
            pytest.param(f"    password:{SECRET}", "put a space after the ':' that follows password", id="no-space"),
            pytest.param(f"    client_secret {SECRET}", "put ': ' right after client_secret", id="client-secret"),
            pytest.param(f"    {{password: {SECRET}", "the { opened on this line is not closed", id="open-brace"),
            pytest.param(f"    password: !{SECRET}", "a value cannot start with ! unless it is in quotes", id="tag"),
            *(pytest.param(f"    {key}: {SECRET}: x", "put the value in quotes", id=key)
              for key in ("salasana", "pass", "smtp_pass", "passwort", "losen", "mdp")),  # not relay's keys: typed anyway
        ],
    )  # fmt: skip
    def test_a_line_under_a_secret_key_is_advised_in_words(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, advice: str
    ) -> None:
        """``relay check`` says what to change on a password's line without repeating the password (the same
        text goes to a pasted ticket and, on a reload, to the daemon's log)."""
        text = base(tmp_path)
        path = write(tmp_path, text.replace(f"    password_file: {tmp_path / 'o365.pw'}", line))

        code, _, err = check(path, capsys)

        assert 1 == code
        assert SECRET not in err
        assert advice in err and f"({path}:7)" in err

    def test_a_password_pasted_under_its_key_is_not_repeated(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A lone word on the line after ``password_file:`` is likely the password itself."""
        path = write(tmp_path, f"upstreams:\n  o365:\n    host: h\n    password_file:\n    {SECRET}\n")

        code, _, err = check(path, capsys)

        assert 1 == code
        assert SECRET not in err
        assert ("this line has no ': ' between its key and its value: put ': ' after the key, before its value "
                f"(key: value) ({path}:5)") in err

    def test_the_daemon_refuses_the_reload_without_logging_the_password(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """SIGHUP with the mistake of the finding: ``reload_refused`` names the line, not the password."""
        path = write_config(tmp_path, upstream, provider)
        relay = RelayProcess(path).start()
        processes.append(relay)
        path.write_text(path.read_text() + f"users:\n  anna:\n    upstream:\n      password: {SECRET}: x\n")

        relay.signal(signal.SIGHUP)
        refused = relay.wait_event("reload_refused")

        [error] = refused["errors"]
        assert error.startswith("users.anna.upstream.password: not valid YAML: the value of password contains ': ', "
                                "which YAML reads as another key: put the value in quotes")  # fmt: skip
        assert SECRET not in "".join(relay.raw)
        relay.signal(signal.SIGTERM)
        assert 0 == relay.wait()


@pytest.fixture
def provider(upstream: UpstreamFactory) -> Upstream:
    return upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": "pw-of-the-provider"})


# endregion

# region #### YAML 1.2 scalars ####


class TestCoreSchema:
    def test_yaml_1_1_words_and_leading_zeros_read_as_an_admin_means_them(self, tmp_path: Path) -> None:
        """``yes``/``no``/``on`` still answer a yes/no key (pydantic reads the text), and ``0465`` is 465, not
        YAML 1.1's octal 309; ``0o17`` is the way to write octal."""
        path = write(tmp_path, base(tmp_path).replace("    port: 587\n", "    port: 0465\n    security: ssl\n"
                                                      "    verify: no\n") + """\
  enabled: yes
delivery:
  workers: 0o17
listeners:
  - address: 127.0.0.1
    port: 02525
    require_tls: off
""")  # fmt: skip

        config = load_config(path)

        assert (465, False, 15, 2525, False, True) == (
            config.upstreams["o365"].port, config.upstreams["o365"].verify, config.delivery.workers,
            config.listeners[0].port, config.listeners[0].require_tls, config.company.enabled,
        )  # fmt: skip

    @pytest.mark.parametrize(
        ("added", "where", "message"),
        [
            pytest.param("  archive_days: yes\n", "company.archive_days", "expected a whole number, got 'yes'",
                         id="yes-for-days"),
            pytest.param("delivery:\n  retry_interval: on\n", "delivery.retry_interval", "expected a number, got 'on'",
                         id="on-for-seconds"),
            pytest.param("listeners:\n  - port: true\n", "listeners[0].port", "expected a whole number, got true",
                         id="true-for-port"),
            pytest.param("listeners:\n  - port: false\n", "listeners[0].port", "expected a whole number, got false",
                         id="false-for-port"),  # not port 0: "the OS picks a free port"
            pytest.param("delivery:\n  workers: TRUE\n", "delivery.workers", "expected a whole number, got true",
                         id="true-for-count"),
            pytest.param("delivery:\n  retry_interval: 1:05\n", "delivery.retry_interval",
                         "expected a number, got '1:05'", id="base-60"),
        ],
    )  # fmt: skip
    def test_a_yes_no_word_or_a_boolean_is_not_a_number(
        self, tmp_path: Path, added: str, where: str, message: str
    ) -> None:
        """Where a number belongs, a boolean or a yes/no word is an error at its line, not 1 or 0."""
        path = write(tmp_path, base(tmp_path) + added)

        [problem] = problems(path)

        assert (where, message, 10 + added.count("\n") - 1) == (problem.path, problem.message, problem.line)

    def test_a_boolean_port_is_said_once_beside_other_errors(self, tmp_path: Path) -> None:
        """``port: false`` on an upstream is "got false", not also pydantic's word on the 0 it made of it; the
        other errors of the file come with it."""
        path = write(tmp_path, base(tmp_path).replace("port: 587", "port: false") + "  archive_days: -1\n")

        found = [(p.path, p.message, p.line) for p in problems(path)]

        assert [("upstreams.o365.port", "expected a whole number, got false", 5),
                ("company.archive_days", "Input should be greater than or equal to 0, got -1", 10)] == found  # fmt: skip


# endregion

# region #### hostile files ####


def bomb(levels: int) -> str:
    """A "billion laughs": each anchor a list of nine aliases of the one before."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


class TestHostileFiles:
    def test_deep_nesting_is_one_error_with_its_line(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """600 ``[`` (PyYAML recursed once per level into a RecursionError traceback)."""
        path = write(tmp_path, "users:\n  a:\n    addresses: " + "[" * 600 + "]" * 600 + "\n")

        code, _, err = check(path, capsys)

        assert 1 == code
        assert (f"error: refused: the values are nested more than 64 levels deep here (brackets or indentation): a "
                f"relay config needs a few; look for [ or {{ repeated or never closed ({path}:3)") in err  # fmt: skip

    def test_aliases_that_multiply_are_refused_at_their_line(self, tmp_path: Path) -> None:
        """Five levels are 59,049 values once expanded: refused at the alias that passes 10,000."""
        path = write(tmp_path, base(tmp_path) + bomb(5))

        [problem] = problems(path)

        assert (problem.path, problem.line) == ("", 14)
        assert problem.message.startswith("refused: with the alias *a3 on this line, the values that aliases repeat "
                                          "pass 10,000 (aliases of aliases multiply)")  # fmt: skip
        # what aliases are for, one upstream's fields for 200 users, stays well under the bound
        users = "".join(f"  u{n}:\n    addresses: u{n}@erp.local\n    upstream: *own\n" for n in range(200))
        text = base(tmp_path) + "x-own: &own {username: shared@yritys.fi, port: 465, security: ssl}\nusers:\n"
        assert ["x-own"] == [p.path for p in problems(write(tmp_path, text + users))]  # x-own is no key of relay's

    def test_the_billion_laughs_of_the_finding_in_bounded_memory(self, tmp_path: Path) -> None:
        """Nine levels, 387 million values expanded: the daemon grew past 8.8 GB on SIGHUP. In 1 GB it is
        refused in one line."""
        path = write(tmp_path, bomb(9))

        done = run_limited("check", str(path))

        assert 1 == done.returncode
        assert "Traceback" not in done.stderr
        assert "error: refused: with the alias *a3 on this line" in done.stderr and f"({path}:5)" in done.stderr

    def test_dev_zero_is_not_read_forever(self) -> None:
        """A file read to its end before any check: ``/dev/zero`` has none."""
        done = run_limited("check", "/dev/zero")

        assert 1 == done.returncode
        assert ("error: (top level): cannot read /dev/zero: it is larger than 1 MiB, which no relay config is (is "
                "it the right file?)") in done.stderr  # fmt: skip

    def test_a_file_over_a_mebibyte_is_refused_unparsed(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A valid file padded past 1 MiB with comments: no relay config is that large (the example with
        every key is 40 KiB), so it is refused before PyYAML spends seconds on it."""
        path = write(tmp_path, base(tmp_path) + ("# " + "x" * 1000 + "\n") * 1100)

        code, _, err = check(path, capsys)

        assert 1 == code
        assert f"cannot read {path}: it is larger than 1 MiB" in err

    def test_a_number_past_pythons_digit_limit(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """5,000 digits: Python's int() refuses them with ValueError, which PyYAML let through as a traceback."""
        path = write(tmp_path, base(tmp_path) + "delivery:\n  workers: " + "9" * 5000 + "\n")

        code, _, err = check(path, capsys)

        assert 1 == code
        assert "delivery.workers: not valid YAML: this number is too long to be read" in err and f"({path}:11)" in err


# endregion

# region #### encoding, documents, comments ####


class TestEncodingAndDocuments:
    def test_a_latin_1_file_names_its_line_and_says_to_save_as_utf_8(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Notepad's "ANSI": the codec's own words named no line and no remedy."""
        path = tmp_path / "relay.yaml"
        path.write_bytes(base(tmp_path).encode() + "  from_name: Ääkkö Oy\n".encode("latin-1"))

        code, _, err = check(path, capsys)

        assert 1 == code
        assert (f"error: byte 0xc4 is not UTF-8 text: save the file as UTF-8 (it was saved in another encoding, such "
                f"as Windows' ANSI or Latin-1) ({path}:10)") in err  # fmt: skip

    def test_a_second_document_is_said_so(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``---`` between two halves of the file; "write it as ---:" was wrong advice."""
        path = write(tmp_path, "---\n" + base(tmp_path) + "---\nusers: {}\n")

        code, _, err = check(path, capsys)

        assert 1 == code
        assert ("error: not valid YAML: a second YAML document starts here: relay reads one; remove the --- or ... "
                f"line that ends the first, and keep every key in one document ({path}:11)") in err  # fmt: skip

    def test_a_leading_document_marker_is_not_the_mistake(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``---`` on the first line is valid YAML: the advice is about the line actually mistyped."""
        path = write(tmp_path, "---\n" + base(tmp_path).replace("    port: 587", "    port 587"))

        code, _, err = check(path, capsys)

        assert 1 == code
        assert ("error: upstreams.o365: not valid YAML: this line has no ': ' between its key and its value: write it "
                f"as  port: 587 ({path}:6)") in err  # fmt: skip


class TestSectionAlone:
    """``read_section``: one top-level key of a file that is not valid YAML as a whole, for the commands
    that need one setting while the daemon runs on its previous config (relay-sendmail, relay queue)."""

    BROKEN = "company:\n  from_name: Test Oy: Laskutus\n"

    @pytest.mark.parametrize(("text", "expected"), [
        ("# comment\nspool_dir: /srv/spool  # ours\n" + BROKEN, {"spool_dir": "/srv/spool"}),
        (BROKEN + "listeners:\n- address: ::1\n\n# the second one\n  port: 02525\n---\nspool_dir: 1\n",
         {"listeners": [{"address": "::1", "port": 2525}]}),  # a list at the key's indentation; YAML 1.2's 02525
        ("\ufeff'listeners': [{address: 127.0.0.1, port: 25}]\r\n" + BROKEN,
         {"listeners": [{"address": "127.0.0.1", "port": 25}]}),
        (BROKEN, {}),
    ])  # fmt: skip
    def test_the_keys_own_lines(self, text: str, expected: dict[str, object]) -> None:
        """From the key's line to the next top-level line, with YAML 1.2's scalars; ``{}`` when no line gives it."""
        key = next(iter(expected), "spool_dir")

        assert expected == read_section(text, key)

    @pytest.mark.parametrize("text", [
        "spool_dir /srv/spool\n",  # the mistake is on the key's own line
        " spool_dir: /srv/spool\n",  # indented: the top-level key one space in, or a nested one?
        "spool_dir: /a\nspool_dir: /b\n",
        "spool_dir: *anchor_elsewhere\n",
        "spool_dir: [\n",
    ])  # fmt: skip
    def test_what_cannot_be_told_is_refused(self, text: str) -> None:
        with pytest.raises(SectionUnreadable):
            read_section(text + self.BROKEN, "spool_dir")


class TestCommentCuts:
    def test_a_hash_glued_to_the_rest_of_a_value_warns(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``from_name: Toimisto #2 Oy`` is ``Toimisto`` and a comment: a warning with the line and the quotes
        to add. A comment set off as one (``587  # STARTTLS``, ``# note``) is left alone, and the file is OK."""
        text = base(tmp_path).replace("port: 587", "port: 587  #STARTTLS") + "  from_name: Toimisto #2 Oy\n"
        path = write(tmp_path, text.replace("host: smtp.example.com", "host: smtp.example.com # the ISP's"))

        code, out, err = check(path, capsys)

        assert 0 == code, err
        warned = [line for line in err.splitlines() if "warning:" in line]
        assert [(f"  warning: company.from_name: is read as 'Toimisto': ' #' starts a YAML comment, which leaves out "
                 f"the rest of the line; if it belongs to the value, put the whole value in quotes (\"...\") ({path}:10)")
                ] == warned  # fmt: skip
        assert f"{path}: OK (1 upstream(s), 0 user(s), 1 warning(s))" in out

    def test_the_cut_value_of_a_secret_key_is_not_repeated(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Under a key that may hold a secret the warning says what YAML did, without the value."""
        monkeypatch.setenv("RELAY_O365", SECRET)
        path = write(tmp_path, base(tmp_path).replace(f"password_file: {tmp_path / 'o365.pw'}", "password_env: RELAY_O365 #2"))

        code, _, err = check(path, capsys)

        assert 0 == code, err
        assert (f"  warning: upstreams.o365.password_env: ' #' starts a YAML comment, which leaves out the rest of the "
                f"line; if it belongs to the value, put the whole value in quotes (\"...\") ({path}:7)"
                ) in err.splitlines()  # fmt: skip
