"""Configuration: loading, every error with its line, warnings, field-by-field resolution, secrets, ``relay check``.

Config texts are written out in full so that the line numbers asserted are the lines of the text as shown
(line 1 is the line right after the opening quotes).
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from relay.commands import cli
from relay.config import credentials
from relay.config.accounts import account_for
from relay.config.credentials import Secret, read_secret
from relay.config.load import load_config, parse_config
from relay.config.models import Config, SecretSource, UpstreamOverride
from relay.config.spoolaccess import unusable_files
from relay.config.types import DEFAULT_SPOOL, LOOPBACK
from relay.config.warnings import BASIC_AUTH_END, check_errors, check_warnings
from relay.errors import ConfigError, ConfigProblem, SecretError
from relay.prepare.settings import USER_ACCOUNT_PREFIX, resolve
from relay.queue.spool import Spool

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"

# A valid company setup; tests append sections after it (it is 10 lines long).
BASE = """\
upstreams:
  o365:
    host: smtp.office365.com
    port: 587
    security: starttls
    username: yritys.tunnus@yritys.fi
    password_env: RELAY_TEST_O365
company:
  upstream: o365
  from_address: yritys@yritys.fi
"""


def problems_of(text: str) -> list[ConfigProblem]:
    """The problems ``parse_config`` reports for ``text`` (it must refuse it)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="relay.yaml")
    return info.value.problems


def where(text: str) -> list[tuple[str, int | None]]:
    """``(key path, line)`` of every problem reported for ``text``, in the order reported."""
    return [(p.path, p.line) for p in problems_of(text)]


def only_problem(text: str) -> ConfigProblem:
    [problem] = problems_of(text)
    return problem


def warnings(config: Config, text: str | None = None) -> list[ConfigProblem]:
    """``check_warnings``, less the default spool_dir's (whether /var/lib is writable depends on who runs the
    tests) and less the Office 365 Basic AUTH reminder that every password account on smtp.office365.com
    here gets (``TestOAuth2Warnings`` tests it)."""
    default_spool = config.spool_dir == Path(DEFAULT_SPOOL)
    return [
        w for w in check_warnings(config, text)
        if not (default_spool and w.path == "spool_dir") and BASIC_AUTH_END not in w.message
    ]  # fmt: skip


def warnings_of(text: str) -> list[tuple[str, int | None]]:
    config = parse_config(text, file="relay.yaml")
    return [(w.path, w.line) for w in warnings(config, text)]


NOBODY = 65534  # the daemon's user in the tests that change owners (root only)


def _chown_tree(path: Path, uid: int) -> None:
    """``chown -R uid:uid path``."""
    for item in [path, *path.rglob("*")]:
        os.chown(item, uid, uid)


def _check_as(uid: int, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """The real ``relay check`` run as ``uid`` (``setpriv``, as ``runuser -u relay --`` in the README)."""
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return subprocess.run([*as_user, sys.executable, "-m", "relay", "check", *options, str(path)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=path.parent)  # fmt: skip


def check_warnings_of_spool(spool: Path) -> list[str]:
    """``check_warnings``' findings about the files in ``spool`` (not about the directory itself)."""
    config = parse_config(BASE + f"spool_dir: {spool}\n", file="relay.yaml")
    return [w.message for w in check_warnings(config) if "cannot read or write" in w.message]


# region #### a valid file ####


class TestCompanyUpstream:
    def test_several_upstreams_need_a_company_upstream(self) -> None:
        """With two accounts and no company.upstream, unknown senders would have nowhere to go."""
        with pytest.raises(ConfigError) as info:
            parse_config("upstreams:\n  a: {host: h}\n  b: {host: h}\n")

        assert "set company.upstream" in str(info.value)

    def test_not_needed_when_unknown_senders_are_refused(self) -> None:
        """identify.unknown: reject means every sender is a user, who names an upstream."""
        config = parse_config(
            "upstreams:\n  a: {host: h}\n  b: {host: h}\nidentify: {unknown: reject}\n"
            "users:\n  u: {addresses: [u@x.fi], upstream: a}\n"
        )

        assert config.company.upstream is None


class TestValidFile:
    def test_minimal_file_gets_the_documented_defaults(self) -> None:
        """A file with only an upstream gets one loopback listener on 2525, the default spool and starttls on 587."""
        config = parse_config("upstreams:\n  o365:\n    host: smtp.office365.com\n")

        assert len(config.listeners) == 1
        assert (config.listeners[0].address, config.listeners[0].port) == ("127.0.0.1", 2525)
        assert config.listeners[0].networks == LOOPBACK
        assert Path(DEFAULT_SPOOL) == config.spool_dir
        assert (
            config.upstreams["o365"].security,
            config.upstreams["o365"].effective_port,
        ) == ("starttls", 587)
        assert config.upstreams["o365"].verify is True

    def test_default_port_follows_security(self) -> None:
        """Without a port, ssl means 465, starttls 587 and none 25."""
        config = parse_config(
            "upstreams:\n  a: {host: h, security: ssl}\n  b: {host: h, security: starttls}\n"
            "  c: {host: h, security: none}\ncompany: {upstream: a}\n"
        )

        assert [config.upstreams[n].effective_port for n in "abc"] == [465, 587, 25]

    def test_base_file_loads(self) -> None:
        """The company setup the other tests build on is valid on its own."""
        config = parse_config(BASE)

        assert config.company.upstream == "o365"

    def test_source_is_the_file_name(self, tmp_path: Path) -> None:
        """``load_config`` remembers which file the config came from (warnings name it)."""
        path = tmp_path / "relay.yaml"
        path.write_text(BASE, encoding="utf-8")

        assert str(path) == load_config(path).source

    def test_unreadable_file_is_a_config_error(self, tmp_path: Path) -> None:
        """A missing file is reported as a config problem that names the file, not a traceback."""
        path = tmp_path / "missing.yaml"

        with pytest.raises(ConfigError) as info:
            load_config(path)

        [problem] = info.value.problems
        assert f"cannot read {path}" in problem.message

    def test_disabled_company_needs_no_upstream(self) -> None:
        """With SMTP sending off for the company (``enabled: false``), no upstream is required."""
        config = parse_config("company:\n  enabled: false\n")

        assert config.company.enabled is False


class TestExampleFile:
    def test_example_loads(self) -> None:
        """config.example.yaml is a valid configuration."""
        config = load_config(EXAMPLE)

        assert {"o365", "gmail", "sms-account"} == set(config.upstreams)
        assert config.sms is not None

    def test_example_mirrors_the_seeds(self) -> None:
        """The example has the Finnish seed's company account, a user's 8-line signature and the SMS gateway."""
        config = load_config(EXAMPLE)
        o365 = config.upstreams["o365"]
        gmail = config.upstreams["gmail"]

        assert (o365.host, o365.effective_port, o365.security) == ("smtp.office365.com", 587, "starttls")
        assert (gmail.host, gmail.effective_port, gmail.security) == ("smtp.gmail.com", 465, "ssl")
        assert len((config.users["pomo"].signature or "").splitlines()) == 8
        assert config.sms is not None and config.sms.gateway == "{number}@smsmail.labyrintti.com"

    def test_example_has_no_inline_secret_and_every_account_names_one(self) -> None:
        """Every account with a username names a password source; no ``password:`` key is set."""
        config = load_config(EXAMPLE)
        text = EXAMPLE.read_text(encoding="utf-8")

        assert re.search(r"^\s*password\s*:", text, re.MULTILINE) is None
        for up in config.upstreams.values():
            assert up.username is None or up.has_secret or up.oauth2 is not None, up

    def test_the_unit_lets_relay_write_back_the_documented_refresh_token_files(self) -> None:
        """ProtectSystem=strict makes /etc read-only: a rotated refresh token could not be saved, and after a
        restart relay would send the provider the old, spent one."""
        unit = (EXAMPLE.parent / "systemd" / "relay.service").read_text(encoding="utf-8")
        writable = [Path(p.lstrip("-")) for p in re.findall(r"^ReadWritePaths=(\S+)", unit, re.MULTILINE)]
        documented = {Path(p) for p in re.findall(r"refresh_token_file: (/\S+)", EXAMPLE.read_text(encoding="utf-8"))}

        assert "ProtectSystem=strict" in unit and documented
        assert [] == [p for p in documented if not any(p.is_relative_to(w) for w in writable)]

    def test_example_documents_every_key(self) -> None:
        """Every field of every config model appears in config.example.yaml, set or commented out."""
        text = EXAMPLE.read_text(encoding="utf-8")
        keys = {
            name
            for model in _models(Config)
            for name, field in model.model_fields.items()
            if not field.exclude  # ``source`` (set by the loader) and the refused ``password``
        }

        missing = sorted(k for k in keys if not re.search(rf"^[\s#-]*{k}:", text, re.MULTILINE))
        assert missing == []


def _models(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[type[BaseModel]]:
    """``model`` and every model reachable through its fields' annotations."""
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    stack: list[Any] = [f.annotation for f in model.model_fields.values()]
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _models(annotation, seen)
        elif isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
            stack.extend(typing.get_args(annotation))
    return seen


# endregion

# region #### errors, one kind at a time ####


class TestYamlErrors:
    def test_invalid_yaml_names_its_line(self) -> None:
        """A YAML syntax error is one problem with the line where the parser stopped."""
        problem = only_problem("company:\n  from_address: a@b.fi\n    from_name: x\n")

        assert problem.line == 3
        assert problem.message.startswith("not valid YAML")

    @pytest.mark.parametrize(
        ("text", "line", "path", "words"),
        [
            pytest.param("listeners:\n  - address: 127.0.0.1\n\tport: 2525\n", 3, "",
                         "a tab in the indentation of this line: YAML takes spaces only (use spaces, not tabs)", id="tab"),
            pytest.param("company:\n  upstream:\to365\n", 2, "company.upstream", "a tab in column 12 of this line",
                         id="tab-after-colon"),
            pytest.param("company:\n  from_address: a@b.fi\n  from_name: Puuseppä Oy: Laskutus\n", 3,
                         "company.from_name", "the value of from_name contains ': ', which YAML reads as another key: "
                         'put the value in quotes, as in  from_name: "Puuseppä Oy: Laskutus"', id="colon-in-value"),
            pytest.param("company:\n  from_address: a@b.fi\n    from_name: Puuseppa\n", 3, "company.from_name",
                         "this line is indented deeper than the one above (line 2), which already has a value: indent "
                         "it by 2 spaces, like from_address: on line 2", id="deeper"),
            pytest.param("upstreams:\n  o365:\n    host: h\n   port: 587\n    username: u\n", 4, "upstreams.o365.port",
                         "this line is indented shallower than the one above (line 3) but lines up with no key above "
                         "it: indent it by 4 spaces (like host: on line 3) or by 2 spaces (like o365: on line 2)",
                         id="shallower"),
            # PyYAML stops at line 4 ("expected <block end>"), a line late: line 3 is the one indented unlike
            # the file's other sections (4 spaces deeper than its key, where the file indents by 2)
            pytest.param("upstreams:\n  o365:\n      host: h\n    port: 587\ncompany:\n  upstream: o365\n", 3,
                         "upstreams.o365.host", "this line is indented by 6 spaces, but line 4, also under o365:, by "
                         "4 spaces (as this file indents): indent it by 4 spaces", id="one-line-late"),
            pytest.param("listeners:\n  - address: 127.0.0.1\n  port: 25\n", 3, "listeners[0].port",
                         "to stay in the list item of line 2, indent it by 4 spaces like address:", id="list-item"),
            pytest.param("company:\n  from_address: a@b.fi\n  from_name Puuseppa\n  signature: x\n", 3, "company",
                         "this line has no ': ' between its key and its value: write it as  from_name: Puuseppa",
                         id="no-colon"),  # PyYAML points at line 4
            pytest.param("company:\n  from_name: \"Puuseppa\n  upstream: o365\nusers: {}\n", 2, "company.from_name",
                         'the value\'s opening " has no closing ": end the value with " on this line',
                         id="unclosed-quote"),  # PyYAML points at the end of the file
            pytest.param('company:\n  from_name: "Puuseppa\n  upstream: o365\n  signature: ""\nusers: {}\n', 2,
                         "company.from_name", 'the value\'s opening " has no closing ": end the value with " on this line',
                         id="unclosed-quote-then-a-pair"),  # PyYAML points at line 4: its "" closed one, opened one
            pytest.param('company:\n  from_name: Puuseppa\n  signature: "a\x1bb"\n', 3, "company.signature",
                         "the control character \\x1b (ESC) cannot be in a YAML file (most editors do not show it): "
                         "delete it, or, if it is meant, write it as \\x1b inside a double-quoted value",
                         id="control-character"),  # PyYAML: "position 42", no line
            pytest.param("users:\n  matti:\n    addresses: [m@x.fi, n@x.fi\n  maija: {}\n", 3, "users.matti.addresses",
                         "the [ opened on this line is not closed: end it with ]", id="unclosed-bracket"),
            pytest.param("company:\n  signature: |\n    --\n   Matti\n", 4, "company",
                         "this line is indented shallower than the text above it, which ends the block started on "
                         "line 2 (|): indent it by 4 spaces like line 3", id="block-text"),
            pytest.param("company:\n  from_address: @x.fi\n", 2, "company.from_address",
                         'a value cannot start with @ unless it is in quotes', id="reserved-character"),
        ],
    )  # fmt: skip
    def test_syntax_errors_say_what_to_change_on_the_right_line(
        self, text: str, line: int, path: str, words: str
    ) -> None:
        """The common mistakes of a hand-edited file come out as advice, at the line to change (PyYAML's own
        text, "mapping values are not allowed here" or "expected <block end>", often a line late, says neither)."""
        problem = only_problem(text)

        assert (line, path) == (problem.line, problem.path)
        assert problem.message.startswith("not valid YAML: ") and words in problem.message

    ADMIN_FILE = """\
listeners:
  - address: 127.0.0.1
    port: 2525
  - address: 127.0.0.2
    port: 25
    allowed_networks: [127.0.0.0/8]
upstreams:
  o365:
    host: smtp.office365.com
    port: 587
    username: yritys@yritys.fi
    password_file: /etc/relay/secrets/o365
company:
  upstream: o365
  from_address: yritys@yritys.fi
  from_name: Yritys Oy
  signature: |
    --
    Yritys Oy
users:
  matti:
    addresses: matti@erp.local
    from_name: Matti
    upstream:
      username: matti@yritys.fi
delivery:
  retry_interval: 60
"""

    @pytest.mark.parametrize("mistake", ["one space more", "one space less", "a tab", "no colon"])
    def test_every_line_of_a_typical_file_mistyped(self, mistake: str) -> None:
        """Each line of a typical file, mistyped the common ways: whenever PyYAML refuses the file, the advice
        is specific (not PyYAML's words) and names the line typed wrong or the next one, never one further."""
        lines = self.ADMIN_FILE.splitlines()
        explained = 0
        for index, line in enumerate(lines):
            changed = {
                "one space more": " " + line,
                "one space less": line.removeprefix(" "),
                "a tab": "\t" + line.lstrip(" "),
                "no colon": line.replace(": ", " ", 1),
            }[mistake]
            text = "\n".join([*lines[:index], changed, *lines[index + 1 :]]) + "\n"
            try:
                yaml.compose(text, Loader=yaml.SafeLoader)
                continue  # still valid YAML (e.g. a deeper plain value): the key checks report it
            except yaml.YAMLError:
                pass
            problem = only_problem(text)
            explained += 1
            assert problem.line in (index + 1, index + 2), (index + 1, changed, str(problem))
            assert "look at the indentation" not in problem.message, (index + 1, changed, str(problem))
        assert explained >= 5

    def test_a_type_error_echoes_the_value(self) -> None:
        """``port: "587x"`` says what was expected and what was written."""
        problem = only_problem(BASE + 'listeners:\n  - address: 127.0.0.1\n    port: "587x"\n')

        assert ("listeners[0].port", 13, "expected a whole number, got '587x'") == (problem.path, problem.line,
                                                                                     problem.message)  # fmt: skip

    def test_a_secret_of_the_wrong_type_is_not_echoed(self) -> None:
        """A value under a key that may hold a secret is never repeated, even when it is the wrong type."""
        problems = problems_of("upstreams:\n  o365:\n    host: h\n    password_env: [hunter2]\ncompany:\n  upstream: o365\n")

        assert [("upstreams.o365.password_env", 4)] == [(p.path, p.line) for p in problems]
        assert "hunter2" not in str(problems[0])

    def test_every_example_line_still_loads(self) -> None:
        """The advice only comes when PyYAML refuses: config.example.yaml loads as it is."""
        assert load_config(EXAMPLE).upstreams

    def test_unclosed_bracket(self) -> None:
        """An unclosed flow list is reported with a line, not a traceback."""
        problem = only_problem("upstreams:\n  o365: {host: h\ncompany: {}\n")

        assert problem.message.startswith("not valid YAML")
        assert problem.line is not None

    @pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
    def test_top_level_must_be_a_mapping(self, text: str) -> None:
        """A list or a scalar at the top level is refused with a plain sentence."""
        problem = only_problem(text)

        assert (problem.path, problem.line) == ("", 1)
        assert "must be a mapping" in problem.message

    def test_empty_file_only_lacks_an_upstream(self) -> None:
        """An empty file is an empty mapping: the one thing missing is an upstream to deliver through."""
        problem = only_problem("")

        assert problem.path == "upstreams"
        assert "at least one upstream" in problem.message

    def test_duplicate_keys_are_reported_at_the_second_one(self) -> None:
        """A key given twice (which YAML would let silently win) is an error at each repetition."""
        text = BASE + "company:\n  from_name: x\nusers:\n  a: {from_name: x, from_name: y}\n"

        assert where(text) == [("company", 11), ("users.a.from_name", 14)]


class TestUnknownKeys:
    def test_unknown_keys_at_every_level_with_their_lines(self) -> None:
        """Misspelt keys are errors at the top level, in a listener, an upstream, the company and a user's upstream."""
        text = """\
listeners:
  - address: 127.0.0.1
    prot: 2525
upstreams:
  o365:
    host: smtp.office365.com
    pasword_file: /etc/relay/secrets/o365
company:
  upstream: o365
  from_adress: yritys@yritys.fi
users:
  pomo:
    upstream:
      usrname: pomo@yritys.fi
spool: /var/spool/relay
"""
        problems = problems_of(text)

        expected = [
            ("listeners[0].prot", 3),
            ("upstreams.o365.pasword_file", 7),
            ("company.from_adress", 10),
            ("users.pomo.upstream.usrname", 14),
            ("spool", 15),
        ]
        assert expected == [(p.path, p.line) for p in problems]
        assert {"unknown key (check the spelling; see config.example.yaml for every key)"} == {
            p.message for p in problems
        }

    def test_unknown_key_in_sms_and_limits(self) -> None:
        """Sections without sub-models (sms, limits, logging) refuse unknown keys too."""
        text = BASE + "sms:\n  gatewy: x\nlimits:\n  max_size: 10M\nlogging:\n  colour: true\n"

        assert where(text) == [("sms.gatewy", 12), ("limits.max_size", 14), ("logging.colour", 16)]


class TestUpstreamErrors:
    @pytest.mark.parametrize("port", ["0", "65536", "smtp", "-25"])
    def test_invalid_port(self, port: str) -> None:
        """A port outside 1-65535, or not a number, is an error on the port's line."""
        text = f"upstreams:\n  o365:\n    host: smtp.office365.com\n    port: {port}\n"

        assert where(text) == [("upstreams.o365.port", 4)]

    def test_invalid_security(self) -> None:
        """``security`` is none, ssl or starttls; the seeds' 'TLS' is not accepted, and the message lists the choices."""
        problem = only_problem("upstreams:\n  o365:\n    host: smtp.office365.com\n    security: TLS\n")

        assert (problem.path, problem.line) == ("upstreams.o365.security", 4)
        assert "'none', 'ssl' or 'starttls'" in problem.message

    def test_host_is_required(self) -> None:
        """A named upstream without a host is an error on the upstream's line."""
        problem = only_problem("upstreams:\n  o365:\n    port: 587\n")

        assert (
            problem.path,
            problem.line,
            problem.message,
        ) == ("upstreams.o365.host", 2, "required key is missing")

    def test_inline_password_is_refused_without_echoing_it(self) -> None:
        """``password:`` is refused with the alternatives, and the password itself appears nowhere in the error."""
        text = "upstreams:\n  o365:\n    host: smtp.office365.com\n    password: hunter2-secret\n"

        with pytest.raises(ConfigError) as info:
            parse_config(text)

        [problem] = info.value.problems
        assert (problem.path, problem.line) == ("upstreams.o365.password", 4)
        assert "password_file" in problem.message and "password_credential" in problem.message
        assert "hunter2-secret" not in str(info.value)
        assert "hunter2-secret" not in repr(info.value.problems)

    def test_inline_password_refused_in_a_user_upstream_and_sms(self) -> None:
        """The same rule holds for a user's own account and for the SMS service password."""
        text = BASE + "users:\n  pomo:\n    upstream:\n      password: x1\nsms:\n  password: x2\n"

        assert where(text) == [("users.pomo.upstream.password", 14), ("sms.password", 16)]

    def test_two_password_sources(self) -> None:
        """Only one of password_file, password_env and password_credential may be given."""
        text = "upstreams:\n  o365:\n    host: h\n    password_file: /x\n    password_env: X\n"

        problem = only_problem(text)

        assert (problem.path, problem.line) == ("upstreams.o365", 2)
        assert problem.message == "give only one password source, not password_file and password_env"

    def test_verify_must_be_a_boolean(self) -> None:
        """``verify: maybe`` is not silently taken as true."""
        assert where(
            "upstreams:\n  o365:\n    verify: maybe\n    host: h\n"
        ) == [("upstreams.o365.verify", 3)]

    def test_timeout_must_be_positive(self) -> None:
        """A zero timeout would make every delivery fail at once."""
        assert where("upstreams:\n  o365:\n    timeout: 0\n    host: h\n") == [("upstreams.o365.timeout", 3)]

    def test_upstream_named_like_a_pydantic_tag_keeps_its_name(self) -> None:
        """An upstream or user whose name starts with 'upstream-' is still named in the error path."""
        text = """\
upstreams:
  upstream-eu:
    host: h
    port: 0
company:
  upstream: upstream-eu
users:
  upstream-admin:
    upstream:
      port: 0
"""
        assert where(text) == [("upstreams.upstream-eu.port", 4), ("users.upstream-admin.upstream.port", 10)]


class TestAddresses:
    def test_bad_company_from_address(self) -> None:
        """company.from_address must be an email address."""
        problem = only_problem(BASE.replace("yritys@yritys.fi", "yritys at yritys.fi"))

        assert (problem.path, problem.line) == ("company.from_address", 10)
        assert problem.message == "not an email address: 'yritys at yritys.fi'"

    def test_bad_address_in_user_addresses_list(self) -> None:
        """One bad entry in a user's YAML list of addresses is reported on that list."""
        text = BASE + "users:\n  pomo:\n    addresses:\n      - pomo@yritys.fi\n      - pomo.yritys.fi\n"

        problem = only_problem(text)

        assert (problem.path, problem.line) == ("users.pomo.addresses", 13)
        assert "'pomo.yritys.fi'" in problem.message

    def test_semicolon_list_is_split(self) -> None:
        """``copy_to`` and ``addresses`` written as in the ERP (';' or ',' separated) become separate addresses."""
        text = BASE + (
            "  copy_to: 'vakio.asiakas@asiakasyritys.fi; oma@yritys.fi ,kolmas@yritys.fi;'\n"
            "users:\n  pomo:\n    addresses: a@yritys.fi;b@yritys.fi\n"
        )

        config = parse_config(text)

        assert config.company.copy_to == (
            "vakio.asiakas@asiakasyritys.fi",
            "oma@yritys.fi",
            "kolmas@yritys.fi",
        )
        assert config.users["pomo"].addresses == ("a@yritys.fi", "b@yritys.fi")

    def test_bad_address_inside_a_semicolon_list(self) -> None:
        """A bad address among ';'-separated ones is named on its own."""
        problem = only_problem(BASE + "  copy_to: 'ok@yritys.fi; not an address; also@yritys.fi'\n")

        assert (problem.path, problem.line) == ("company.copy_to", 11)
        assert problem.message == "not an email address: 'not an address'"

    def test_bad_user_copy_to(self) -> None:
        """A user's own default recipient is checked like the company's."""
        assert where(BASE + "users:\n  pomo:\n    copy_to: pomo@\n") == [("users.pomo.copy_to", 13)]

    @pytest.mark.parametrize(
        "value", ['"Oma Nimi\\r\\nBcc: all@example.com"', '"Oma\\nNimi"', '"Oma\\rNimi"']
    )
    def test_line_break_in_from_name_is_header_injection(self, value: str) -> None:
        """CR or LF in ``from_name`` would let a config value add headers: refused."""
        problem = only_problem(BASE + f"users:\n  pomo:\n    from_name: {value}\n")

        assert (problem.path, problem.line) == ("users.pomo.from_name", 13)
        assert "line breaks" in problem.message

    def test_line_break_in_from_address_is_refused(self) -> None:
        """An address with a line break is refused before anything checks its syntax."""
        problem = only_problem(
            BASE.replace("from_address: yritys@yritys.fi", 'from_address: "y@y.fi\\nBcc: x@x.fi"')
        )

        assert problem.path == "company.from_address"
        assert "line breaks" in problem.message

    def test_multi_line_signature_is_allowed(self) -> None:
        """Unlike header values, a signature has several lines (the seed's eight ``Allekirjoitus`` lines)."""
        config = parse_config(BASE + "  signature: |\n    Oma Nimi\n    Testikatu 10\n    00120 TESTILÄ\n")

        assert config.company.signature == "Oma Nimi\nTestikatu 10\n00120 TESTILÄ\n"


class TestListeners:
    def test_non_loopback_listener_needs_allowed_networks(self) -> None:
        """Binding a LAN address without saying who may send would make relay an open relay."""
        text = BASE + "listeners:\n  - address: 127.0.0.1\n  - address: 0.0.0.0\n    port: 25\n"

        problem = only_problem(text)

        assert (problem.path, problem.line) == ("listeners[1]", 13)
        assert "open relay" in problem.message

    def test_non_loopback_listener_with_allowed_networks(self) -> None:
        """With an explicit allowed_networks list a LAN listener is fine."""
        text = (
            BASE
            + "listeners:\n  - address: 192.0.2.5\n    allowed_networks: [192.0.2.0/24, 127.0.0.1]\n"
        )

        config = parse_config(text)

        assert [str(n) for n in config.listeners[0].networks] == ["192.0.2.0/24", "127.0.0.1/32"]

    def test_ipv6_loopback_needs_no_list(self) -> None:
        """::1 is loopback: the default allowed list applies."""
        config = parse_config(BASE + "listeners:\n  - address: '::1'\n")

        assert config.listeners[0].networks == LOOPBACK

    def test_listener_address_must_be_an_ip(self) -> None:
        """A host name is not accepted as a listener address."""
        assert where(BASE + "listeners:\n  - address: localhost\n") == [("listeners[0].address", 12)]

    def test_bad_allowed_network_is_one_problem(self) -> None:
        """A bad network is reported once, in plain words, not once per IP type pydantic tried."""
        problem = only_problem(BASE + "listeners:\n  - allowed_networks: [198.51.100.0/33]\n")

        assert (problem.path, problem.line) == ("listeners[0].allowed_networks[0]", 12)
        assert problem.message.startswith("not an IP address or network")

    def test_listeners_must_be_a_list(self) -> None:
        """``listeners: 2525`` is an error, not a crash."""
        assert where(BASE + "listeners: 2525\n") == [("listeners", 11)]

    def test_listener_user_must_exist(self) -> None:
        """A listener's ``user`` must be one of ``users``."""
        text = BASE + "users:\n  pomo: {}\nlisteners:\n  - port: 2526\n    user: varasto\n"

        problem = only_problem(text)

        assert (problem.path, problem.line) == ("listeners[0].user", 15)
        assert problem.message == "no user named 'varasto'"


class TestReferences:
    def test_company_names_an_unknown_upstream(self) -> None:
        """``company.upstream`` must name an entry of ``upstreams``; the message lists the names there are."""
        problem = only_problem(BASE.replace("upstream: o365", "upstream: office"))

        assert (problem.path, problem.line) == ("company.upstream", 9)
        assert problem.message == "no upstream named 'office' (upstreams: o365)"

    def test_user_names_an_unknown_upstream(self) -> None:
        """A user's ``upstream`` name must exist."""
        assert where(BASE + "users:\n  pomo:\n    upstream: gmail\n") == [("users.pomo.upstream", 13)]

    def test_sms_names_an_unknown_upstream(self) -> None:
        """The SMS route's ``upstream`` must exist."""
        text = BASE + "sms:\n  gateway: '{number}@smsmail.labyrintti.com'\n  upstream: sms-account\n"

        assert where(text) == [("sms.upstream", 13)]

    def test_sms_gateway_needs_the_number_placeholder(self) -> None:
        """With the number in the address, the gateway address must say where it goes."""
        assert where(BASE + "sms:\n  gateway: '@smsmail.labyrintti.com'\n") == [("sms.gateway", 12)]

    def test_sms_gateway_without_placeholder_when_number_in_subject(self) -> None:
        """With ``number_in: subject`` the gateway is a fixed address, as in the seed's ``@smsmail...`` field."""
        config = parse_config(BASE + "sms:\n  gateway: sms@smsmail.labyrintti.com\n  number_in: subject\n")

        assert config.sms is not None and config.sms.number_in == "subject"

    def test_two_users_claim_one_address(self) -> None:
        """An address identifies one user only; case does not matter and from_address counts."""
        text = BASE + (
            "users:\n"
            "  pomo:\n"
            "    addresses: oma.nimi@yritys.fi\n"
            "  sihteeri:\n"
            "    from_address: sihteeri@yritys.fi\n"
            "    addresses: [sihteeri@yritys.fi, Oma.Nimi@Yritys.fi]\n"
        )

        problem = only_problem(text)

        assert (problem.path, problem.line) == ("users.sihteeri.addresses", 16)
        assert problem.message == "oma.nimi@yritys.fi also identifies user 'pomo'"

    def test_user_inline_upstream_without_host_and_no_company_upstream(self) -> None:
        """Inline account fields without a host need a company upstream to take the host from."""
        text = """\
upstreams:
  o365: {host: smtp.office365.com}
users:
  pomo:
    upstream:
      username: pomo@yritys.fi
      password_file: /etc/relay/secrets/pomo
"""
        problem = only_problem(text)

        assert (problem.path, problem.line) == ("users.pomo.upstream", 5)
        assert "no host" in problem.message

    def test_no_upstreams_at_all(self) -> None:
        """An enabled company with users but no upstream account cannot deliver anything."""
        problem = only_problem("company:\n  from_address: yritys@yritys.fi\nusers:\n  pomo: {}\n")

        assert (problem.path, problem.line) == ("upstreams", 1)
        assert problem.message == "define at least one upstream account to deliver through"

    def test_empty_upstreams_mapping(self) -> None:
        """``upstreams: {}`` is the same as none, reported on its line."""
        assert where("company: {}\nupstreams: {}\n") == [("upstreams", 2)]


class TestSizes:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ("35M", 35 * 1024**2),
            ("35MB", 35 * 1024**2),
            ("10k", 10 * 1024),
            ("1G", 1024**3),
            ("1000", 1000),
            (1000, 1000),
        ],
    )
    def test_size_with_unit(self, given: object, expected: int) -> None:
        """Sizes are bytes, or a number with K, M or G (powers of 1024), an optional B, any case."""
        config = parse_config(BASE + f"limits:\n  max_message_size: {given}\n")

        assert expected == config.limits.max_message_size

    @pytest.mark.parametrize("given", ["lots", "35 MiB", "0", "-1", "true", "3.5M"])
    def test_bad_size(self, given: str) -> None:
        """Anything else, zero and negative sizes are errors on the size's line."""
        assert where(BASE + f"limits:\n  max_message_size: {given}\n") == [("limits.max_message_size", 12)]


class TestManyErrorsAtOnce:
    def test_every_error_is_reported_with_its_line(self) -> None:
        """One file with many different mistakes gets all of them in one report, in file order."""
        text = """\
listeners:
  - address: 0.0.0.0
    port: 25
upstreams:
  o365:
    host: smtp.office365.com
    port: 99999
    security: tls
    password: hunter2
company:
  upstream: o365
  from_address: not-an-address
  colour: blue
users:
  pomo:
    addresses: oma.nimi@yritys.fi
    from_name: "Oma Nimi\\r\\nBcc: everyone@example.com"
    upstream: gmail
  sihteeri:
    addresses: [sihteeri@yritys.fi, oma.nimi@yritys.fi]
limits:
  max_message_size: lots
  max_message_size: 35M
sms:
  upstream: sms-account
"""
        problems = problems_of(text)

        expected = [
            ("listeners[0]", 2),
            ("upstreams.o365.port", 7),
            ("upstreams.o365.security", 8),
            ("upstreams.o365.password", 9),
            ("company.from_address", 12),
            ("company.colour", 13),
            ("users.pomo.from_name", 17),
            ("users.pomo.upstream", 18),
            ("users.sihteeri.addresses", 20),
            ("limits.max_message_size", 23),  # given twice: the second (valid) one is what pydantic saw
            ("sms.upstream", 25),
        ]
        assert expected == [(p.path, p.line) for p in problems]
        assert problems[9].message == "key given twice; the second would silently win"
        assert all(p.file == "relay.yaml" for p in problems)
        assert "hunter2" not in "\n".join(str(p) for p in problems)

    def test_two_password_sources_reported_with_the_other_errors(self) -> None:
        """Two password sources are reported alongside the section's other errors (upstream, user account, sms)."""
        text = """\
upstreams:
  o365:
    host: smtp.office365.com
    port: 0
    password_file: /etc/relay/secrets/o365
    password_env: RELAY_O365
company:
  upstream: o365
  from_address: not-an-address
users:
  pomo:
    upstream:
      security: tls
      password_env: RELAY_POMO
      password_credential: pomo
sms:
  number_in: fax
  password_file: /etc/relay/secrets/sms
  password_credential: sms
"""
        problems = problems_of(text)

        assert [
            ("upstreams.o365", 2, "give only one password source, not password_file and password_env"),
            ("upstreams.o365.port", 4, "Input should be greater than or equal to 1, got 0"),
            ("company.from_address", 9, "not an email address: 'not-an-address'"),
            ("users.pomo.upstream", 12, "give only one password source, not password_env and password_credential"),
            ("users.pomo.upstream.security", 13, "Input should be 'none', 'ssl' or 'starttls', got 'tls'"),
            ("sms", 16, "give only one password source, not password_file and password_credential"),
            ("sms.number_in", 17, "Input should be 'address', 'subject' or 'body', got 'fax'"),
        ] == [(p.path, p.line, p.message) for p in problems]

    def test_error_text_has_path_message_and_place(self) -> None:
        """Each problem prints as 'path: message (file:line)', like a compiler's error."""
        problem = only_problem("upstreams:\n  o365:\n    host: h\n    port: 0\n")

        assert str(
            problem
        ) == "upstreams.o365.port: Input should be greater than or equal to 1, got 0 (relay.yaml:4)"


# endregion

# region #### warnings ####


def _upstream(port: int | None = None, security: str | None = None, extra: str = "") -> str:
    lines = ["upstreams:", "  o365:", "    host: smtp.office365.com"]
    if port is not None:
        lines.append(f"    port: {port}")
    if security is not None:
        lines.append(f"    security: {security}")
    return "\n".join(lines) + "\n" + extra


class TestWarnings:
    @pytest.fixture(autouse=True)
    def _passwords_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The environment variables the texts name are set, as in the daemon's environment."""
        monkeypatch.setenv("RELAY_TEST_O365", "pw")
        monkeypatch.setenv("RELAY_X", "pw")

    def test_clean_config_has_no_warnings(self) -> None:
        """starttls on 587 with an environment variable password is not suspicious."""
        assert warnings_of(BASE) == []

    def test_delay_warning_after_the_queue_lifetime_is_never_sent(self) -> None:
        text = BASE + "delivery:\n  max_queue_lifetime: 3600\n  delay_warning: 7200\n"
        assert warnings_of(text) == [("delivery.delay_warning", text.splitlines().index("  delay_warning: 7200") + 1)]

    def test_ssl_on_587(self) -> None:
        """Implicit TLS on the STARTTLS port would hang at the handshake."""
        assert warnings_of(_upstream(587, "ssl")) == [("upstreams.o365.security", 5)]

    def test_starttls_on_465(self) -> None:
        """STARTTLS on the implicit-TLS port is flagged."""
        assert warnings_of(_upstream(465, "starttls")) == [("upstreams.o365.security", 5)]

    def test_port_995_is_pop3s(self) -> None:
        """The seed's user form had port 995 with SSL: that is POP3S, for reading mail."""
        config = parse_config(_upstream(995, "ssl"))

        [warning] = warnings(config, _upstream(995, "ssl"))

        assert (warning.path, warning.line) == ("upstreams.o365.port", 4)
        assert "POP3S" in warning.message

    def test_verify_false(self) -> None:
        """Turning certificate verification off is flagged."""
        assert warnings_of(_upstream(extra="    verify: false\n")) == [("upstreams.o365.verify", 4)]

    def test_none_with_a_password(self) -> None:
        """A password over an unencrypted connection is flagged."""
        text = _upstream(25, "none", "    password_env: RELAY_X\n")

        assert warnings_of(text) == [("upstreams.o365.security", 5)]

    def test_secret_file_readable_by_others(self, tmp_path: Path) -> None:
        """A 0644 password file is flagged with its mode; 0600 is not."""
        secret = tmp_path / "o365"
        secret.write_text("pw\n")
        secret.chmod(0o644)
        text = _upstream(extra=f"    password_file: {secret}\n")
        config = parse_config(text)

        [warning] = warnings(config, text)
        secret.chmod(0o600)

        assert (warning.path, warning.line) == ("upstreams.o365.password_file", 4)
        assert "mode 0644" in warning.message
        assert warnings(config, text) == []

    def test_missing_secret_file(self, tmp_path: Path) -> None:
        """A password file that does not exist is an error, not a warning: nobody, the daemon included, can read it."""
        text = _upstream(extra=f"    password_file: {tmp_path / 'nope'}\n")
        config = parse_config(text)

        [error] = check_errors(config, text)

        assert (error.path, error.line) == ("upstreams.o365.password_file", 4)
        assert f"password file {tmp_path / 'nope'} does not exist: create it" in error.message
        assert warnings(config, text) == []

    def test_every_missing_secret_file_is_an_error(self, tmp_path: Path) -> None:
        """OAuth2 client secrets and refresh tokens, users' own and the SMS route's password files too; a file
        named twice (a YAML alias) once."""
        text = O365_OAUTH.replace("client_secret_env: RELAY_TEST_APP", f"client_secret_file: {tmp_path}/app") + f"""\
users:
  anna:
    upstream:
      host: smtp.gmail.com
      username: anna@gmail.com
      auth: oauth2
      oauth2:
        provider: google
        client_id: x
        client_secret_file: {tmp_path}/app
        refresh_token_file: {tmp_path}/anna-refresh
  pekka:
    upstream:
      host: mail.example.fi
      username: pekka@example.fi
      password_file: {tmp_path}/pekka
sms:
  password_file: {tmp_path}/sms
"""
        found = [(e.path, e.line) for e in check_errors(parse_config(text), text)]

        assert [("upstreams.o365.oauth2.client_secret_file", 9), ("users.anna.upstream.oauth2.refresh_token_file", 23),
                ("users.pekka.upstream.password_file", 28), ("sms.password_file", 30)] == found  # fmt: skip

    def test_user_inline_upstream_is_checked(self, tmp_path: Path) -> None:
        """A user's own account fields get the same checks (port 995, verify off, readable secret)."""
        secret = tmp_path / "pomo"
        secret.write_text("pw\n")
        secret.chmod(0o644)
        text = BASE + (
            f"users:\n  pomo:\n    upstream:\n      port: 995\n      security: ssl\n"
            f"      verify: false\n      password_file: {secret}\n"
        )

        expected = [
            ("users.pomo.upstream.port", 14),
            ("users.pomo.upstream.verify", 16),
            ("users.pomo.upstream.password_file", 17),
        ]
        assert expected == warnings_of(text)

    def test_user_port_with_the_company_security(self) -> None:
        """A user who sets only ``port: 465`` keeps the company's starttls: the starttls-on-465 warning."""
        [warning] = warnings(parse_config(BASE + "users:\n  pomo:\n    upstream:\n      port: 465\n"))

        assert warning.path == "users.pomo.upstream.port"
        assert "security starttls is the company upstream's" in warning.message

    def test_user_security_alone_is_not_suspicious(self) -> None:
        """Only ``security: ssl`` over the company's 587 is fine: the port follows the security (465)."""
        assert warnings_of(BASE + "users:\n  pomo:\n    upstream:\n      security: ssl\n") == []

    def test_redirect_all(self) -> None:
        """A test installation that sends everything to one address says so."""
        assert warnings_of(
            BASE + "rewrite:\n  redirect_all: testi@yritys.fi\n"
        ) == [("rewrite.redirect_all", 12)]

    def test_missing_ca_file(self, tmp_path: Path) -> None:
        """A ca_file that is not there (a company account or a user's own) is named at its key."""
        missing = tmp_path / "nope.pem"
        text = _upstream(extra=f"    ca_file: {missing}\n") + (
            f"users:\n  pomo:\n    upstream:\n      ca_file: {tmp_path}\ncompany:\n  upstream: o365\n"
        )
        config = parse_config(text)

        assert [
            ("upstreams.o365.ca_file", 4, f"ca_file {missing} does not exist"),
            ("users.pomo.upstream.ca_file", 8, f"ca_file {tmp_path} is a directory, not a PEM file"),
        ] == [(w.path, w.line, w.message) for w in warnings(config, text)]

    def test_existing_ca_file_is_not_suspicious(self, ca_file: Path) -> None:
        """A readable ca_file gives no warning."""
        assert warnings_of(_upstream(extra=f"    ca_file: {ca_file}\n")) == []

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_unreadable_ca_file(self, tmp_path: Path) -> None:
        """A ca_file this user cannot read is named as such."""
        pem = tmp_path / "ca.pem"
        pem.write_text("x")
        pem.chmod(0)
        text = _upstream(extra=f"    ca_file: {pem}\n")

        [warning] = warnings(parse_config(text), text)

        assert f"ca_file {pem} cannot be read by this user" in warning.message

    def test_password_that_cannot_be_read_now(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each account's and the SMS service's password is read as a check; what fails is named, never a value."""
        monkeypatch.delenv("RELAY_TEST_O365")
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        text = BASE + (
            "users:\n  pomo:\n    upstream:\n      username: pomo@yritys.fi\n      password_credential: pomo\n"
            "sms:\n  password_env: RELAY_SMS_PW\n"
        )

        found = [(w.path, w.line, w.message) for w in warnings(parse_config(text), text)]

        assert [
            ("upstreams.o365.password_env", 7, "environment variable RELAY_TEST_O365 is not set"),
            ("users.pomo.upstream.password_credential", 15,
             ("systemd credential 'pomo' named, but CREDENTIALS_DIRECTORY is not set (systemd gives it to "
             "relay.service only, with LoadCredential=pomo:FILE in the unit)")),
            ("sms.password_env", 17, "environment variable RELAY_SMS_PW is not set"),
        ] == found  # fmt: skip

    def test_readable_passwords_are_not_suspicious(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Once the variable, the credential and the file exist, the same file has no warning."""
        (tmp_path / "pomo").write_text("pw\n")
        secret = tmp_path / "sms"
        secret.write_text("pw\n")
        secret.chmod(0o600)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        text = BASE + (
            "users:\n  pomo:\n    upstream:\n      password_credential: pomo\n"
            f"sms:\n  password_file: {secret}\n"
        )

        assert warnings_of(text) == []

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_unreadable_secret_file_is_one_warning(self, tmp_path: Path) -> None:
        """A password file this user cannot read gets one warning that says so (no second 'mode' warning)."""
        secret = tmp_path / "o365"
        secret.write_text("pw\n")
        secret.chmod(0)
        text = _upstream(extra=f"    password_file: {secret}\n")

        [warning] = warnings(parse_config(text), text)

        assert (warning.path, f"password file {secret} cannot be read") == (
            "upstreams.o365.password_file",
            warning.message[: len(f"password file {secret} cannot be read")],
        )

    def test_spool_dir_that_is_a_file(self, tmp_path: Path) -> None:
        """A spool_dir that is a file, or below a file, cannot hold the queue: an error (the daemon cannot
        start, whoever runs it), not a warning as well."""
        (tmp_path / "file").write_text("")
        for spool, reason in [
            (tmp_path / "file", "exists and is not a directory"),
            (tmp_path / "file" / "spool", f"{tmp_path / 'file'} is not a directory"),
        ]:
            text = BASE + f"spool_dir: {spool}\n"
            config = parse_config(text)

            [error] = check_errors(config, text)

            assert (error.path, error.line) == ("spool_dir", 11)
            assert f"spool_dir {spool}: {reason}: relay cannot store mail there and will not start" == error.message
            assert warnings(config, text) == []

    def test_spool_dir_that_can_be_created(self, tmp_path: Path) -> None:
        """A spool_dir that does not exist yet is fine when its closest existing parent is writable."""
        assert warnings_of(BASE + f"spool_dir: {tmp_path / 'var' / 'spool'}\n") == []

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
    def test_spool_dir_under_a_read_only_directory(self, tmp_path: Path) -> None:
        """The closest existing parent must be writable, or the daemon cannot create the spool."""
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        text = BASE + f"spool_dir: {locked / 'spool'}\n"

        [warning] = warnings(parse_config(text), text)

        assert f"{locked} is not writable by this user" in warning.message
        assert warning.message.endswith("relay will not be able to store mail")

    def test_warnings_without_text_have_no_line(self) -> None:
        """Without the file's text, warnings still name the key path."""
        [warning] = warnings(parse_config(_upstream(587, "ssl")))

        assert (warning.path, warning.line) == ("upstreams.o365.security", None)


# endregion

# region #### field-by-field resolution ####

RESOLVE = """\
upstreams:
  o365:
    host: smtp.office365.com
    port: 587
    security: starttls
    username: yritys.tunnus@yritys.fi
    password_file: /etc/relay/secrets/o365
    timeout: 45
  gmail:
    host: smtp.gmail.com
    security: ssl
    username: myynti@gmail.com
    password_credential: gmail
company:
  upstream: o365
  from_address: yritys@yritys.fi
  from_name: Yrityksen edustaja
  copy_to: arkisto@yritys.fi
  signature: Yritys Oy
users:
  laskutus:
    from_address: laskutus@yritys.fi
  myynti:
    upstream: gmail
  pomo:
    from_name: Oma Nimi
    copy_to: vakio.asiakas@asiakasyritys.fi; oma.nimi@yritys.fi
    signature: "Oma Nimi\\nTestikatu 10"
    upstream:
      username: oma.nimi@yritys.fi
      password_env: RELAY_POMO
  varasto:
    addresses: [varasto@yritys.fi]
    copy_to: []
    upstream:
      host: smtp.elisa.fi
      security: ssl
  vanha:
    reject: true
"""


@pytest.fixture
def config() -> Config:
    return parse_config(RESOLVE)


class TestResolve:
    def test_company_defaults_alone(self, config: Config) -> None:
        """An unidentified sender gets the company's address, name, copy, signature and account."""
        settings = resolve(config, None, "company_default")

        assert (settings.from_address, settings.from_name) == ("yritys@yritys.fi", "Yrityksen edustaja")
        assert settings.copy_to == ("arkisto@yritys.fi",)
        assert settings.signature == "Yritys Oy"
        assert settings.account is not None and settings.account.name == "o365"
        assert settings.enabled is True

    def test_user_with_only_from_address_uses_the_company_upstream(self, config: Config) -> None:
        """Overriding one field changes that field only: the company account, name, copy and signature remain."""
        settings = resolve(config, "laskutus", "envelope_sender")

        assert settings.from_address == "laskutus@yritys.fi"
        assert (
            settings.from_name,
            settings.copy_to,
            settings.signature,
        ) == ("Yrityksen edustaja", ("arkisto@yritys.fi",), "Yritys Oy")
        assert settings.account is not None
        assert (
            settings.account.name,
            settings.account.host,
            settings.account.port,
        ) == ("o365", "smtp.office365.com", 587)

    def test_user_with_upstream_name_uses_it(self, config: Config) -> None:
        """A user naming an upstream sends through that account (port from its security)."""
        account = resolve(config, "myynti", "header_from").account

        assert account is not None
        assert (
            account.name,
            account.host,
            account.port,
            account.security,
        ) == ("gmail", "smtp.gmail.com", 465, "ssl")
        assert (account.username, account.password_credential) == ("myynti@gmail.com", "gmail")

    def test_user_inline_upstream_inherits_the_company_account(self, config: Config) -> None:
        """Inline username + password source are laid over the company account: host, port, security, timeout stay."""
        account = resolve(config, "pomo", "envelope_sender").account

        assert account is not None
        assert account.name == USER_ACCOUNT_PREFIX + "pomo"
        assert (
            account.host,
            account.port,
            account.security,
            account.timeout,
        ) == ("smtp.office365.com", 587, "starttls", 45.0)
        assert account.username == "oma.nimi@yritys.fi"

    def test_user_password_source_replaces_the_company_one(self, config: Config) -> None:
        """The user's own password is used, never the company's (no two sources are merged)."""
        account = resolve(config, "pomo", "envelope_sender").account

        assert account is not None
        assert (
            account.password_env,
            account.password_file,
            account.password_credential,
        ) == ("RELAY_POMO", None, None)

    def test_user_own_host_inherits_nothing(self, config: Config) -> None:
        """A user's own server is a separate account: the company's login, password, port and timeout stay home."""
        account = resolve(config, "varasto", "listener").account

        assert account is not None
        assert (account.host, account.port, account.security) == ("smtp.elisa.fi", 465, "ssl")
        assert (
            account.username,
            account.password_file,
            account.password_env,
            account.password_credential,
        ) == (None, None, None, None)
        assert account.timeout == 60.0

    def test_user_own_security_gets_its_port(self) -> None:
        """A user who changes only the security on the company's server gets that security's port, not 587."""
        config = parse_config(BASE + "users:\n  pomo:\n    upstream:\n      security: ssl\n")

        account = resolve(config, "pomo", "envelope_sender").account

        assert account is not None
        assert (account.host, account.port, account.security) == ("smtp.office365.com", 465, "ssl")
        assert (account.username, account.password_env) == ("yritys.tunnus@yritys.fi", "RELAY_TEST_O365")

    def test_user_same_host_different_case_still_inherits(self) -> None:
        """Naming the company's own server again (any case) keeps the company's login as the default."""
        config = parse_config(BASE + "users:\n  pomo:\n    upstream:\n      host: SMTP.Office365.com\n")

        account = resolve(config, "pomo", "envelope_sender").account

        assert account is not None
        assert (account.port, account.username) == (587, "yritys.tunnus@yritys.fi")

    def test_user_fields_fall_back_to_company(self, config: Config) -> None:
        """Fields a user leaves out (from_address here) come from the company; those set are the user's."""
        settings = resolve(config, "pomo", "envelope_sender")

        assert settings.from_address == "yritys@yritys.fi"
        assert settings.from_name == "Oma Nimi"
        assert settings.copy_to == ("vakio.asiakas@asiakasyritys.fi", "oma.nimi@yritys.fi")
        assert settings.signature == "Oma Nimi\nTestikatu 10"

    def test_user_without_from_address_sends_as_the_company(self, config: Config) -> None:
        """from_address is a field like the others: a user without one gets the company's."""
        assert resolve(config, "varasto", "listener").from_address == "yritys@yritys.fi"

    def test_first_address_is_the_sender_when_nobody_sets_from_address(self) -> None:
        """With no from_address for the user or the company, the user's first address is the sender."""
        config = parse_config(
            "upstreams:\n  o: {host: h}\nusers:\n  u:\n    addresses: b@yritys.fi; a@yritys.fi\n"
        )

        assert resolve(config, "u", "envelope_sender").from_address == "b@yritys.fi"

    def test_empty_copy_to_clears_the_company_copy(self, config: Config) -> None:
        """``copy_to: []`` for a user means no copies, not the company's."""
        assert resolve(config, "varasto", "listener").copy_to == ()

    def test_rejected_user_is_disabled(self, config: Config) -> None:
        """``reject: true`` turns sending off for that user only."""
        assert (
            resolve(config, "vanha", "envelope_sender").enabled,
            resolve(config, "laskutus", "envelope_sender").enabled,
        ) == (False, True)

    def test_identified_by_is_kept(self, config: Config) -> None:
        """The rule that identified the user travels with the settings (for the log)."""
        assert resolve(config, "laskutus", "client_address").identified_by == "client_address"

    def test_single_upstream_is_the_default(self) -> None:
        """With exactly one upstream and no company.upstream, that one is used."""
        config = parse_config("upstreams:\n  only: {host: smtp.example.fi}\n")

        account = resolve(config, None, "company_default").account

        assert account is not None and account.name == "only"


class TestAccountFor:
    def test_named_upstream(self, config: Config) -> None:
        """A queue entry's account name is resolved against the current config."""
        assert account_for(config, "gmail").host == "smtp.gmail.com"

    def test_user_account(self, config: Config) -> None:
        """``user:<id>`` is that user's inline account laid over the company's."""
        assert account_for(config, "user:pomo").username == "oma.nimi@yritys.fi"

    @pytest.mark.parametrize("name", ["office", "user:nobody", "user:myynti", "user:laskutus", ""])
    def test_unknown_name_is_a_config_error(self, config: Config, name: str) -> None:
        """A name that is no longer configured (removed upstream, user without own account) raises ConfigError."""
        with pytest.raises(ConfigError) as info:
            account_for(config, name)

        [problem] = info.value.problems
        assert f"queued mail names upstream {name!r}, which is no longer configured" == problem.message

    def test_inline_upstream_is_an_override_model(self, config: Config) -> None:
        """A mapping under a user's ``upstream`` is parsed as account fields, a string as a name."""
        assert isinstance(config.users["pomo"].upstream, UpstreamOverride)
        assert config.users["myynti"].upstream == "gmail"


# endregion

# region #### secrets ####


class TestReadSecret:
    def test_from_file(self, tmp_path: Path) -> None:
        """A password file's content without its trailing line break."""
        path = tmp_path / "pw"
        path.write_text("s3cret pass\r\n", encoding="utf-8")

        secret = read_secret(SecretSource(password_file=path))

        assert secret is not None and secret.reveal() == "s3cret pass"

    def test_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``password_env`` names an environment variable."""
        monkeypatch.setenv("RELAY_TEST_PW", "from-env")

        secret = read_secret(SecretSource(password_env="RELAY_TEST_PW"))

        assert secret is not None and secret.reveal() == "from-env"

    def test_from_systemd_credential(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """``password_credential`` is read from ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``)."""
        (tmp_path / "o365").write_text("from-credential\n", encoding="utf-8")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

        secret = read_secret(SecretSource(password_credential="o365"))

        assert secret is not None and secret.reveal() == "from-credential"

    def test_no_source_is_no_secret(self) -> None:
        """An account without a password source has no secret (no AUTH password)."""
        assert read_secret(SecretSource()) is None

    def test_missing_file_names_the_path(self, tmp_path: Path) -> None:
        """A missing password file is a SecretError naming the file."""
        path = tmp_path / "missing"

        with pytest.raises(SecretError) as info:
            read_secret(SecretSource(password_file=path))

        assert f"password file {path} does not exist" == str(info.value)

    def test_unset_environment_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unset variable is named in the error."""
        monkeypatch.delenv("RELAY_TEST_UNSET", raising=False)

        with pytest.raises(SecretError) as info:
            read_secret(SecretSource(password_env="RELAY_TEST_UNSET"))

        assert str(info.value) == "environment variable RELAY_TEST_UNSET is not set"

    def test_credential_without_credentials_directory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Outside a unit with ``LoadCredential=`` the error says what to add."""
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

        with pytest.raises(SecretError) as info:
            read_secret(SecretSource(password_credential="o365"))

        assert "LoadCredential=" in str(info.value)

    def test_missing_credential_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A credential not loaded into the directory names its path."""
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

        with pytest.raises(SecretError) as info:
            read_secret(SecretSource(password_credential="gmail"))

        assert f"systemd credential {tmp_path / 'gmail'} does not exist" == str(info.value)

    def test_secret_never_shows_its_value(self, tmp_path: Path) -> None:
        """repr, str and f-strings of a Secret (as a log or traceback would show them) hide the value."""
        path = tmp_path / "pw"
        path.write_text("hunter2\n", encoding="utf-8")

        secret = read_secret(SecretSource(password_file=path))

        assert "Secret('...')" == repr(secret) == str(secret) == f"{secret}"
        assert "hunter2" not in repr({"password": secret}) and "hunter2" not in repr([secret])

    def test_secret_is_read_at_each_call(self, tmp_path: Path) -> None:
        """A changed password file is used by the next read, without a reload."""
        path = tmp_path / "pw"
        path.write_text("old\n", encoding="utf-8")
        source = SecretSource(password_file=path)
        first = read_secret(source)
        path.write_text("new\n", encoding="utf-8")

        second = read_secret(source)

        assert (first.reveal() if first else None, second.reveal() if second else None) == ("old", "new")

    @staticmethod
    def _settled(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Let the file age past the time after which its text is remembered (shortened for the test: a
        ctime cannot be set back), as a password file set up long before the delivery that reads it."""
        monkeypatch.setattr(credentials, "_SETTLED_NS", 50_000_000)
        time.sleep(0.1)

    @staticmethod
    def _count_opens(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
        opened: list[str] = []
        real_open = os.open

        def recording_open(name: Any, *args: Any, **kwargs: Any) -> int:
            if os.fspath(name) == str(path):
                opened.append(os.fspath(name))
            return real_open(name, *args, **kwargs)

        monkeypatch.setattr(os, "open", recording_open)
        return opened

    def test_settled_unchanged_file_is_not_read_again(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A password file unchanged since long before is read once; later attempts only look at its status."""
        path = tmp_path / "pw"
        path.write_text("s3cret\n", encoding="utf-8")
        self._settled(path, monkeypatch)
        opened = self._count_opens(monkeypatch, path)
        source = SecretSource(password_file=path)

        secrets = [read_secret(source) for _ in range(3)]

        assert [s.reveal() if s else None for s in secrets] == ["s3cret"] * 3
        assert len(opened) == 1

    def test_same_size_change_with_old_times_is_read(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A new password of the same length, the file's mtime set back as before: its ctime changed, so
        the new one is read (a status the write cannot fake)."""
        path = tmp_path / "pw"
        path.write_text("aaaa\n", encoding="utf-8")
        self._settled(path, monkeypatch)
        before = os.stat(path)
        source = SecretSource(password_file=path)
        first = read_secret(source)
        path.write_text("bbbb\n", encoding="utf-8")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

        second = read_secret(source)

        assert (first.reveal() if first else None, second.reveal() if second else None) == ("aaaa", "bbbb")

    def test_fresh_file_is_read_at_every_call(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file written just now is not remembered: a second write within the same clock tick, same size,
        would leave its status unchanged."""
        path = tmp_path / "pw"
        path.write_text("s3cret\n", encoding="utf-8")
        opened = self._count_opens(monkeypatch, path)
        source = SecretSource(password_file=path)

        read_secret(source)
        read_secret(source)

        assert len(opened) == 2

    def test_file_made_unreadable_fails_though_remembered(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A chmod changes the ctime: the next read is tried, and its refusal reported as before."""
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-000 file")
        path = tmp_path / "pw"
        path.write_text("s3cret\n", encoding="utf-8")
        self._settled(path, monkeypatch)
        source = SecretSource(password_file=path)
        read_secret(source)
        path.chmod(0)

        with pytest.raises(SecretError, match="cannot be read by the relay daemon"):
            read_secret(source)

    def test_removed_file_fails_though_remembered(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "pw"
        path.write_text("s3cret\n", encoding="utf-8")
        self._settled(path, monkeypatch)
        source = SecretSource(password_file=path)
        read_secret(source)
        path.unlink()

        with pytest.raises(SecretError, match="does not exist"):
            read_secret(source)

    def test_account_is_a_secret_source(self, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
        """A resolved account reads its secret the same way (here a user's own environment variable)."""
        monkeypatch.setenv("RELAY_POMO", "pomo-pw")
        account = resolve(config, "pomo", "envelope_sender").account
        assert account is not None

        secret = read_secret(account)

        assert isinstance(secret, Secret) and secret.reveal() == "pomo-pw"


# endregion

# region #### relay check ####


class TestCheckCommand:
    def test_bad_file_lists_every_error_and_exits_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``relay check`` prints each error with its key path and file:line to stderr and returns 1."""
        path = tmp_path / "relay.yaml"
        path.write_text(
            "upstreams:\n  o365:\n    host: h\n    port: 0\n    security: tls\ncompany:\n  upstream: nope\n",
            encoding="utf-8",
        )

        code = cli.main(["check", str(path)])

        err = capsys.readouterr().err
        assert code == 1
        assert f"relay: {path}: 3 error(s):" in err
        assert f"error: upstreams.o365.port: Input should be greater than or equal to 1, got 0 ({path}:4)" in err
        assert "error: upstreams.o365.security: " in err and f"({path}:5)" in err
        assert f"error: company.upstream: no upstream named 'nope' (upstreams: o365) ({path}:7)" in err

    def test_suspicious_file_warns_and_exits_0(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Warnings are printed with their lines, but the file is usable: exit 0 and an OK line on stdout."""
        path = tmp_path / "relay.yaml"
        path.write_text(_upstream(587, "ssl", "    verify: false\n"), encoding="utf-8")

        code = cli.main(["check", str(path)])

        out, err = capsys.readouterr()
        assert code == 0
        assert "warning: upstreams.o365.security: " in err and f"({path}:5)" in err
        assert "warning: upstreams.o365.verify: " in err and f"({path}:6)" in err
        assert "warning: upstreams.o365.host: Office 365 turns password (Basic) SMTP AUTH off" in err
        assert f"{path}: OK (1 upstream(s), 0 user(s), 3 warning(s))" == out.strip()

    def test_two_password_sources_and_another_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``relay check`` reports a two-source upstream and an unrelated error in one run, each with its line."""
        path = tmp_path / "relay.yaml"
        path.write_text(
            "upstreams:\n  o365:\n    host: h\n    password_file: /x\n    password_env: X\n"
            "company:\n  upstream: o365\n  from_address: nobody\n",
            encoding="utf-8",
        )

        code = cli.main(["check", str(path)])

        err = capsys.readouterr().err
        assert code == 1
        assert f"relay: {path}: 2 error(s):" in err
        assert f"error: upstreams.o365: give only one password source, not password_file and password_env ({path}:2)" in err
        assert f"error: company.from_address: not an email address: 'nobody' ({path}:8)" in err

    def test_yaml_syntax_error_in_words_from_the_real_command(self, tmp_path: Path) -> None:
        """The issue's case through the installed command: ``relay check`` names the line and says to quote."""
        path = tmp_path / "relay.yaml"
        path.write_text(BASE + "  from_name: Puuseppä Oy: Laskutus\n", encoding="utf-8")

        done = subprocess.run([sys.executable, "-m", "relay", "check", str(path)], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip

        assert 1 == done.returncode
        assert (f"error: company.from_name: not valid YAML: the value of from_name contains ': ', which YAML reads as "
                f'another key: put the value in quotes, as in  from_name: "Puuseppä Oy: Laskutus" ({path}:11)'
                ) in done.stderr  # fmt: skip

    def test_a_missing_secret_file_fails_the_check_an_unreadable_one_warns(self) -> None:
        """The real command, run as a user who is not the secrets' owner (as an admin runs it): a password file
        that does not exist is an error and the exit code 1; one that exists but that this user cannot read
        stays a warning (the daemon's user may read it)."""
        with tempfile.TemporaryDirectory() as folder:
            base = Path(folder)
            base.chmod(0o755)
            secrets = base / "secrets"
            secrets.mkdir(mode=0o755)
            unreadable = secrets / "o365"
            unreadable.write_text("pw\n")
            unreadable.chmod(0o600 if os.geteuid() == 0 else 0o000)  # root: read by another user below
            path = base / "relay.yaml"
            path.write_text(BASE.replace("password_env: RELAY_TEST_O365", f"password_file: {unreadable}") + f"""\
users:
  pekka:
    upstream:
      username: pekka@yritys.fi
      password_file: {secrets}/pekka
""", encoding="utf-8")  # fmt: skip
            path.chmod(0o644)
            as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []

            done = subprocess.run([*as_other, sys.executable, "-m", "relay", "check", str(path)], capture_output=True,
                                  text=True, timeout=60, check=False, cwd=folder)  # fmt: skip

        assert 1 == done.returncode, done.stderr
        assert (f"error: users.pekka.upstream.password_file: password file {secrets}/pekka does not exist: create it "
                f"(mode 0600, owned by relay's user) or correct the path ({path}:15)") in done.stderr  # fmt: skip
        assert f"warning: upstreams.o365.password_file: password file {unreadable} cannot be read" in done.stderr
        assert f"{path}: NOT OK (1 error(s), " in done.stdout

    @pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
    def test_spool_files_left_by_a_run_as_root_fail_the_check(self) -> None:
        """Finding 3: ``relay serve`` run once as root leaves root's 0600 files in relay's spool, and the daemon
        then cannot start. ``relay check`` as the daemon's user (and ``--startup``, the unit's ExecStartPre=),
        or as root, names them and the chown; an entry the daemon reads at start is an error, a message body
        (read only at its delivery) a warning. The scan stops at the first three."""
        with tempfile.TemporaryDirectory() as folder:
            base = Path(folder)
            base.chmod(0o755)
            spool = base / "spool"
            Spool(spool).setup()
            for number in range(5):
                (spool / "deferred" / f"6620F8011F10156AD0{number}.json").write_text("{}")
            (spool / "msg" / "6620F8011F10156AD00.eml").write_text("x")
            _chown_tree(spool, NOBODY)
            os.chown(spool / "msg" / "6620F8011F10156AD00.eml", 0, 0)
            for number in range(5):
                os.chown(spool / "deferred" / f"6620F8011F10156AD0{number}.json", 0, 0)
            path = base / "relay.yaml"
            path.write_text(BASE + f"spool_dir: {spool}\n", encoding="utf-8")
            path.chmod(0o644)

            as_relay = _check_as(NOBODY, path)
            startup = _check_as(NOBODY, path, "--startup")
            as_root = _check_as(0, path)
            _chown_tree(spool, NOBODY)
            (spool / "lost+found").mkdir(mode=0o700)  # a dedicated ext4 spool: root's, and none of relay's business
            (spool / "NOTES.txt").write_text("admin's")
            (spool / "maildrop").mkdir(mode=0o3733)  # other users' files are what it holds
            (spool / "maildrop" / "18ef0fe16f7b1cc5.4896928f607b97d8db8d63130dbf2b36").write_text("{}")
            fixed = _check_as(NOBODY, path, "--startup")

        name = pwd.getpwuid(NOBODY).pw_name
        error = (f"error: spool_dir: spool_dir {spool}: {name} (its owner, the user relay runs as) cannot read or write "
                 "deferred/6620F8011F10156AD00.json (root, -rw-r--r--), deferred/6620F8011F10156AD01.json (root, "
                 "-rw-r--r--), deferred/6620F8011F10156AD02.json (root, -rw-r--r--) and maybe more: relay opens these "
                 f"at start and will not start; a relay serve run as root leaves such files: chown -R {name}: {spool} "
                 f"({path}:11)")  # fmt: skip
        warning = (f"warning: spool_dir: spool_dir {spool}: {name} (its owner, the user relay runs as) cannot read or "
                   "write msg/6620F8011F10156AD00.eml (root, -rw-r--r--): relay starts, but cannot deliver or show the "
                   f"messages they belong to; a relay serve run as root leaves such files: chown -R {name}: {spool}")
        for done in (as_relay, startup, as_root):
            assert 1 == done.returncode, done.stderr
            assert f"  {error}" in done.stderr.splitlines()
            assert f"{path}: NOT OK (1 error(s), " in done.stdout
        assert warning in as_relay.stderr and warning in as_root.stderr
        assert (0, "") == (fixed.returncode, "".join(line for line in fixed.stderr.splitlines() if "spool" in line))

    def test_an_entry_its_owner_cannot_read(self, tmp_path: Path) -> None:
        """The same scan, run by the spool's owner (or, for root, on the owner's behalf): a file whose mode
        lets its owner neither read nor write is one relay cannot open either."""
        spool = tmp_path / "spool"
        Spool(spool).setup()
        entry = spool / "incoming" / "6620F8011F10156AD00.json"
        entry.write_text("{}")
        entry.chmod(0)
        if os.geteuid() == 0:
            _chown_tree(spool, NOBODY)

        uid, found = unusable_files(spool, at_start=True)

        assert (NOBODY if os.geteuid() == 0 else os.geteuid()) == uid
        assert ["incoming/6620F8011F10156AD00.json"] == [item.name for item in found]
        assert ([], []) == (unusable_files(spool, at_start=False)[1], check_warnings_of_spool(spool))

    def test_startup_check_lets_the_daemon_start_without_a_secret_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``relay check --startup`` (the unit's ExecStartPre=) fails only on what stops the daemon: a missing
        password file is a warning there, so mail is taken and waits in the queue until the file is there."""
        path = tmp_path / "relay.yaml"
        path.write_text(_upstream(extra=f"    password_file: {tmp_path / 'nope'}\n"), encoding="utf-8")

        assert 1 == cli.main(["check", str(path)])
        capsys.readouterr()
        code = cli.main(["check", "--startup", str(path)])

        out, err = capsys.readouterr()
        assert 0 == code
        assert f"warning: upstreams.o365.password_file: password file {tmp_path / 'nope'} does not exist" in err
        assert f"{path}: OK (" in out

    def test_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A file that does not exist is an error, not a traceback."""
        code = cli.main(["check", str(tmp_path / "nope.yaml")])

        assert code == 1
        assert "cannot read" in capsys.readouterr().err

    def test_example_passes(self, capsys: pytest.CaptureFixture[str]) -> None:
        """config.example.yaml loads; ``relay check`` finds only what is absent on this machine: its secret
        files (errors: exit 1), its systemd credential and, when the tests do not run as root, the spool's
        parent (warnings)."""
        code = cli.main(["check", str(EXAMPLE)])

        out, err = capsys.readouterr()
        assert code == 1
        assert "NOT OK" in out
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("relay: ")]
        errors = [line for line in lines if "error:" in line]
        assert errors and all("does not exist: create it" in e for e in errors), errors
        absent_here = ("is not set", "CREDENTIALS_DIRECTORY", "relay will not be able to store mail")
        assert all(any(a in w for a in absent_here) for w in lines if "warning:" in w), lines


# endregion


# region #### OAuth2 accounts ####

O365_OAUTH = """\
upstreams:
  o365:
    host: smtp.office365.com
    username: yritys.tunnus@yritys.fi
    auth: oauth2
    oauth2:
      tenant: yritys.onmicrosoft.com
      client_id: 00000000-0000-0000-0000-000000000000
      client_secret_env: RELAY_TEST_APP
company:
  upstream: o365
  from_address: yritys@yritys.fi
"""


class TestOAuth2Config:
    def test_app_only_microsoft_defaults(self) -> None:
        """Microsoft app-only: the tenant's v2.0 token endpoint and Exchange's .default scope."""
        account = account_for(parse_config(O365_OAUTH), "o365")

        assert account.oauth2 is not None
        assert "https://login.microsoftonline.com/yritys.onmicrosoft.com/oauth2/v2.0/token" == account.oauth2.token_url
        assert "https://outlook.office365.com/.default" == account.oauth2.scope
        assert not account.oauth2.delegated

    @pytest.mark.parametrize(("url", "refused"), [
        ("http://login.microsoftonline.com/t/oauth2/v2.0/token", "must start with https://"),
        ("ftp://login.microsoftonline.com/t/oauth2/v2.0/token", "must start with https://"),
        ("https://login microsoftonline.com/t/oauth2/v2.0/token", "expected a URL"),
        ("https://login.microsoftonline.com:99999/t/oauth2/v2.0/token", "port"),
        ("http://127.0.0.1:8080/token", None),
        ("http://[::1]:8080/token", None),
        ("https://login.microsoftonline.com/t/oauth2/v2.0/token", None),
    ])  # fmt: skip
    def test_token_url_is_https_unless_on_this_machine(self, url: str, refused: str | None) -> None:
        """The client secret is posted to token_url: over plain http it would cross the network in clear."""
        text = O365_OAUTH.replace("      client_id:", f"      token_url: {url}\n      client_id:")

        if refused is None:
            assert url == parse_config(text).upstreams["o365"].oauth2.token_url  # type: ignore[union-attr]
        else:
            [problem] = problems_of(text)
            assert ("upstreams.o365.oauth2.token_url", 8) == (problem.path, problem.line)
            assert refused in problem.message

    @pytest.mark.parametrize("host", ["https://graph.microsoft.com", "graph.microsoft.com/v1.0", "graph microsoft.com"])
    def test_a_graph_host_written_as_a_url_is_refused(self, host: str) -> None:
        """Graph's URL is built from host and port: a URL in host failed every delivery as a DNS error."""
        text = O365_OAUTH.replace("    host: smtp.office365.com\n", f"    type: graph\n    host: {host}\n")

        [problem] = problems_of(text)

        assert ("upstreams.o365.host", 4) == (problem.path, problem.line) and "not a URL" in problem.message

    def test_graph_defaults(self) -> None:
        """type: graph needs no host or port: graph.microsoft.com:443, scope Graph's .default."""
        text = O365_OAUTH.replace("    host: smtp.office365.com\n", "    type: graph\n").replace("    auth: oauth2\n", "")
        account = account_for(parse_config(text), "o365")

        assert ("graph", "graph.microsoft.com", 443) == (account.transport, account.host, account.port)
        assert account.oauth2 is not None and "https://graph.microsoft.com/.default" == account.oauth2.scope

    def test_google_refresh_token_defaults(self) -> None:
        """Google delegated: Google's token endpoint, scope https://mail.google.com/."""
        text = O365_OAUTH.replace("      tenant: yritys.onmicrosoft.com\n", "      provider: google\n").replace(
            "client_secret_env: RELAY_TEST_APP", "refresh_token_file: /etc/relay/secrets/gmail-refresh")
        account = account_for(parse_config(text), "o365")

        assert account.oauth2 is not None and account.oauth2.delegated
        assert ("https://oauth2.googleapis.com/token", "https://mail.google.com/") == (
            account.oauth2.token_url, account.oauth2.scope)

    def test_google_without_a_refresh_token_is_refused(self) -> None:
        """Gmail has no client-credentials grant: a client secret alone would fail at every delivery."""
        text = O365_OAUTH.replace("      tenant: yritys.onmicrosoft.com\n", "      provider: google\n")

        problem = only_problem(text)

        assert "upstreams.o365.oauth2" == problem.path and "refresh_token_file" in problem.message

    def test_a_user_with_only_a_username_uses_the_companys_app(self) -> None:
        """The example's POMO: the company's OAuth2 app logs in to his own mailbox."""
        config = load_config(EXAMPLE)
        pomo = account_for(config, "user:pomo")
        company = account_for(config, "o365")

        assert "oma.nimi@yritys.fi" == pomo.username
        assert pomo.oauth2 == company.oauth2 and pomo.oauth2 is not None

    def test_a_users_own_password_replaces_the_companys_oauth2(self) -> None:
        """A login is never half of each: an own password source means a password login."""
        text = O365_OAUTH + "users:\n  u:\n    addresses: u@yritys.fi\n    upstream:\n      username: u@yritys.fi\n" \
                            "      password_file: /etc/relay/secrets/u\n"
        account = account_for(parse_config(text), "user:u")

        assert (None, Path("/etc/relay/secrets/u")) == (account.oauth2, account.password_file)

    @pytest.mark.parametrize(
        ("old", "new", "message"),
        [
            ("    auth: oauth2\n", "    auth: oauth2\n    password_file: /x\n", "an OAuth2 account has no password"),
            ("      tenant: yritys.onmicrosoft.com\n", "", "tenant is required for provider microsoft"),
            ("      client_secret_env: RELAY_TEST_APP\n", "", "give client_secret_file"),
            ("      client_secret_env: RELAY_TEST_APP\n",
             "      client_secret_env: A\n      client_secret_file: /x\n", "give only one client secret source"),
            ("      client_secret_env: RELAY_TEST_APP\n", "      client_secret: inline\n", "never written in the shared"),
            ("    username: yritys.tunnus@yritys.fi\n", "", "username is required"),
            ("    auth: oauth2\n", "", "set auth: oauth2 to use it"),
            ("      tenant: yritys.onmicrosoft.com\n", "      tenant: 'bad tenant/..'\n", "expected a tenant domain"),
        ],
    )  # fmt: skip
    def test_impossible_combinations_are_errors_with_their_line(self, old: str, new: str, message: str) -> None:
        problems = problems_of(O365_OAUTH.replace(old, new))

        assert any(message in p.message and p.line for p in problems), problems

    def test_auth_oauth2_without_its_block(self) -> None:
        text = O365_OAUTH.split("    oauth2:")[0] + "company:\n  upstream: o365\n"
        assert any("needs an oauth2: block" in p.message for p in problems_of(text))


class TestOAuth2Warnings:
    def test_password_auth_on_office365_is_warned_about_with_the_date(self) -> None:
        """Every password account on smtp.office365.com: it stops working at the end of December 2026."""
        config = parse_config(BASE, file="relay.yaml")
        found = [w for w in check_warnings(config, BASE) if BASIC_AUTH_END in w.message]

        assert [("upstreams.o365.host", 3)] == [(w.path, w.line) for w in found]
        assert "auth: oauth2" in found[0].message

    @pytest.mark.parametrize(("own", "warned"), [
        ("      username: oma.nimi@yritys.fi\n      password_env: RELAY_TEST_APP\n", True),
        ("      username: oma.nimi@yritys.fi\n", False),  # the company's OAuth2 app, the user's mailbox
    ])  # fmt: skip
    def test_a_users_own_password_over_the_companys_office365_is_warned_about(
        self, monkeypatch: pytest.MonkeyPatch, own: str, warned: bool
    ) -> None:
        """The override names no host and no auth: the account it resolves to is password AUTH on Office 365."""
        monkeypatch.setenv("RELAY_TEST_APP", "x")
        text = O365_OAUTH + "users:\n  pomo:\n    addresses: [pomo@yritys.fi]\n    upstream:\n" + own
        config = parse_config(text, file="relay.yaml")

        found = [(w.path, w.line) for w in check_warnings(config, text) if BASIC_AUTH_END in w.message]

        assert ([("users.pomo.upstream.host", 16)] if warned else []) == found

    def test_oauth2_account_is_not_warned_about(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RELAY_TEST_APP", "x")
        assert [] == warnings_of(O365_OAUTH)

    def test_refresh_token_that_cannot_be_written_back(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A rotated refresh token cannot go back into an environment variable: relay check says so."""
        monkeypatch.setenv("RELAY_TEST_APP", "x")
        text = O365_OAUTH.replace("client_secret_env: RELAY_TEST_APP", "refresh_token_env: RELAY_TEST_APP")

        [warning] = warnings(parse_config(text), text)

        assert "upstreams.o365.oauth2" == warning.path and "cannot be written back" in warning.message

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
    def test_refresh_token_folder_relay_cannot_write(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A rotated refresh token is saved by writing a new file beside the old one: the folder must allow it."""
        monkeypatch.setenv("RELAY_TEST_APP", "x")
        folder = tmp_path / "secrets"
        folder.mkdir()
        (folder / "refresh").write_text("rt\n")
        (folder / "refresh").chmod(0o600)
        folder.chmod(0o500)
        text = O365_OAUTH.replace("      client_secret_env: RELAY_TEST_APP\n",
                                  f"      client_secret_env: RELAY_TEST_APP\n      refresh_token_file: {folder}/refresh\n")

        found = warnings(parse_config(text), text)

        folder.chmod(0o700)
        assert ["upstreams.o365.oauth2"] == [w.path for w in found] and "not writable" in found[0].message

    def test_missing_client_secret_file(self) -> None:
        """A client secret file that does not exist is an error (``check_errors``), not a warning as well."""
        text = O365_OAUTH.replace("client_secret_env: RELAY_TEST_APP", "client_secret_file: /nonexistent/app")
        config = parse_config(text)

        [error] = check_errors(config, text)

        assert error.message.startswith("client secret file /nonexistent/app does not exist: create it")
        assert warnings(config, text) == []


# endregion


class TestOsUsers:
    def test_names_and_uids(self) -> None:
        """``os_users`` takes OS user names and uids; a quoted number is a uid too."""
        text = BASE + "users:\n  matti:\n    os_users: [matti, 1001, '1002', 'CORP\\matti']\n"

        assert ("matti", 1001, 1002, "CORP\\matti") == parse_config(text).users["matti"].os_users

    @pytest.mark.parametrize("value", ["[-1]", "[true]", "['two words']", "['matti:x']", "[{uid: 1}]"])
    def test_what_is_not_a_user_is_refused_with_its_line(self, value: str) -> None:
        """A negative uid, a boolean, spaces or a colon cannot name an OS user."""
        assert [("users.matti.os_users", 13)] == where(BASE + f"users:\n  matti:\n    os_users: {value}\n")

    def test_an_os_user_belongs_to_one_user(self) -> None:
        """The same OS user under two users is an error (the first would silently win)."""
        text = BASE + "users:\n  a:\n    os_users: [matti]\n  b:\n    os_users: [liisa, matti]\n"

        problem = only_problem(text)

        assert ("users.b.os_users", 15) == (problem.path, problem.line)
        assert "OS user matti is already given for user 'a'" == problem.message

    def test_warnings_for_a_missing_rule_and_an_unknown_name(self) -> None:
        """os_users without os_user in identify.order does nothing; a name unknown here matches nobody."""
        text = BASE + "users:\n  a:\n    os_users: [root, no-such-user-here]\n"

        found = [w.message for w in warnings(parse_config(text, file="relay.yaml"), text) if "os_user" in w.path]

        assert ["is set, but identify.order has no os_user: nobody is identified by it",
                "OS user 'no-such-user-here' does not exist on this machine"] == found  # fmt: skip

    def test_warning_without_linux_socket_tables(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """``relay check`` says when the os_user rule cannot work on this system."""
        from relay import osuser

        monkeypatch.setattr(osuser, "TABLES", (tmp_path / "tcp", tmp_path / "tcp6"))
        text = BASE + "users:\n  a:\n    os_users: [0]\nidentify:\n  order: [os_user]\n"

        [warning] = [w for w in warnings(parse_config(text, file="relay.yaml"), text) if w.path.startswith("identify")]

        assert ("identify.order", 15) == (warning.path, warning.line)
        assert "needs Linux's /proc/net/tcp" in warning.message
