"""Every recipient a client got a 250 for is accounted for (issue 12).

The invariant, for every submission: each member of each accepted RCPT (after splitting the seeds'
``;``/``,`` lists) ends up in exactly one of: the queued mail entry, a queued SMS entry, or a refusal the
client saw at RCPT. Rewrites (recipient rules, ``redirect_all``) show in the entry's notes. The property
test drives the listener's own RCPT parsing and checking (``parse_rcpt``, ``check_recipient``) and then
``prepare``, over generated recipient sets; the end-to-end cases through a running relay are in
``test_seed_scenarios.py`` (``TestSms``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.config.load import parse_config
from relay.config.models import Config
from relay.envelope import Submission
from relay.errors import ConfigError, RefusedError
from relay.intake.listener import check_recipient, parse_rcpt
from relay.prepare.pipeline import prepare

EXAMPLES = int(os.environ.get("RELAY_PROPERTY_EXAMPLES", "300"))
GATEWAY = re.compile(r"sms-\+(?P<digits>[0-9]+)@gw\.example")
NUMBERS = {"401234567": "+358401234567", "501112222": "+358501112222"}
RULE = {"match": "@old.example", "replace": "@new.example"}


@dataclass(frozen=True)
class Member:
    """One recipient as a legacy program types it, and what relay must make of it."""

    typed: str
    kind: str  # "mail", "sms" or "invalid"
    canonical: str  # mail: the address; sms: the E.164 number


def _case(text: str, upper: bool) -> str:
    return text.upper() if upper else text


mail_members = st.builds(
    lambda local, domain, upper: Member(_case(f"{local}@{domain}", upper), "mail", f"{local}@{domain}"),
    st.sampled_from(["anna", "pekka", "o.virtanen", "x+tag", "laskut"]),
    st.sampled_from(["example.com", "asiakas.fi", "old.example"]),
    st.booleans(),
)


def _spellings(national: str) -> list[str]:
    """Every way the seeds' users type one number (all accepted by relay)."""
    a, b, c = national[:2], national[2:5], national[5:]
    return [f"+358{national}", f"0{national}", f"0{a} {b} {c}", f"0{a}-{b}-{c}", f"(0{a}) {b} {c}",
            f"+358 (0){a} {b} {c}", f"00358{national}", f'"0{a} {b} {c}"']  # fmt: skip


sms_members = st.builds(
    lambda national, spelling, domain: Member(f"{_spellings(national)[spelling]}@{domain}", "sms", NUMBERS[national]),
    st.sampled_from(sorted(NUMBERS)),
    st.integers(0, len(_spellings("401234567")) - 1),
    st.sampled_from(["sms.local", "SMS.Local"]),
)
invalid_members = st.builds(
    lambda typed: Member(typed, "invalid", ""), st.sampled_from(["12@sms.local", "040 1@sms.local", "a@@b.fi", "@x.fi"])
)
members = st.one_of(mail_members, mail_members, sms_members, invalid_members)


@st.composite
def rcpt_argument(draw: st.DrawFn) -> tuple[str, list[Member]]:
    """One RCPT TO argument: a single address or a list, bracketed as a whole, per member, or not."""
    chosen = draw(st.lists(members, min_size=1, max_size=4))
    separator = draw(st.sampled_from([";", "; ", ",", ", ", " ; "]))
    style = draw(st.sampled_from(["whole", "each", "bare"]))
    if style == "each":
        return separator.join(f"<{m.typed}>" for m in chosen), chosen
    joined = separator.join(m.typed for m in chosen)
    return (f"<{joined}>" if style == "whole" else joined), chosen


@st.composite
def setup(draw: st.DrawFn) -> dict[str, Any]:
    company: dict[str, Any] = {"upstream": "main", "from_address": "erp@firma.fi"}
    copies = draw(st.sampled_from([[], ["arkisto@firma.fi"], ["arkisto@firma.fi", "0501112222@sms.local"], ["ANNA@example.com"]]))
    if copies:
        company["copy_to"] = "; ".join(copies)
    rewrite: dict[str, Any] = {}
    if draw(st.booleans()):
        rewrite["recipient_rules"] = [RULE]
    if draw(st.booleans()):
        rewrite["redirect_all"] = "testi@firma.fi"
    return {
        "upstreams": {"main": {"host": "smtp.example.com"}},
        "company": company,
        "rewrite": rewrite,
        "sms": {"gateway": "sms-{number}@gw.example", "domain": "sms.local"},  # a dotted domain: allowed in copy_to
    }


def _accept(arg: str, config: Config) -> str | None:
    """What the listener does with one RCPT: the value it stores, or None when it refused."""
    address, params = parse_rcpt(arg)
    if not address or params:
        return None
    try:
        check_recipient(address, config)
    except RefusedError:
        return None
    return address


def _rule(address: str, rules: bool) -> str:
    if rules and address.lower().endswith(RULE["match"]):
        return address.rpartition("@")[0] + RULE["replace"]
    return address


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup(), st.lists(rcpt_argument(), min_size=1, max_size=4))
def test_every_accepted_recipient_is_queued_or_was_refused(data: dict[str, Any], rcpts: list[tuple[str, list[Member]]]) -> None:
    config = parse_config(yaml.safe_dump(data))
    rules, redirect = bool(data["rewrite"].get("recipient_rules")), data["rewrite"].get("redirect_all")
    accepted: list[str] = []
    want_mail: set[str] = set()
    want_sms: set[str] = set()
    for arg, chosen in rcpts:
        stored = _accept(arg, config)
        has_invalid = any(m.kind == "invalid" for m in chosen)
        assert (stored is None) == has_invalid, f"RCPT {arg!r}: stored {stored!r}"
        if stored is None:
            continue  # the client saw the refusal: nothing of it may be queued
        accepted.append(stored)
        want_mail |= {_rule(m.canonical, rules).lower() for m in chosen if m.kind == "mail"}
        want_sms |= {m.canonical for m in chosen if m.kind == "sms"}
    if not accepted:
        return
    copies = [a.strip() for a in data["company"].get("copy_to", "").split(";") if a.strip()]
    want_mail |= {a.lower() for a in copies if not a.endswith("@sms.local")}
    want_sms |= {"+358" + a[1:].partition("@")[0] for a in copies if a.endswith("@sms.local")}
    if redirect:
        want_mail, want_sms = {redirect}, set()

    out = prepare(config, Submission("ajo@erp.local", tuple(accepted), b"Subject: x\r\n\r\nbody\r\n", "127.0.0.1"))

    mail = [m for m in out.messages if m.kind == "mail"]
    sms = [m for m in out.messages if m.kind == "sms"]
    got_mail = [r.lower() for m in mail for r in m.recipients]
    got_sms = ["+" + GATEWAY.fullmatch(r).group("digits") for m in sms for r in m.recipients]  # type: ignore[union-attr]
    assert sorted(got_mail) == sorted(want_mail)  # each once: no duplicates, nothing lost, nothing added
    assert sorted(got_sms) == sorted(want_sms)
    assert len(mail) == (1 if want_mail else 0)
    notes = " | ".join(n for m in out.messages for n in m.notes)
    if redirect:
        assert "redirect_all" in notes
    elif rules and any(a.lower().endswith(RULE["match"]) for a in want_mail | {m.canonical for _, c in rcpts for m in c}):
        moved = {m.canonical.lower() for _, c in rcpts for m in c if m.kind == "mail" and m.canonical.endswith(RULE["match"])}
        if moved & {a.lower() for arg in accepted for a in re.split(r"[;,]", arg)}:
            assert "@new.example" in notes


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("<a@x.test; +358401234567@sms>", "a@x.test;+358401234567@sms"),
        ("<a@x.test>; <0401234567@sms>", "a@x.test;0401234567@sms"),
        ("<a@x.test; 040 123 4567@sms>", "a@x.test;0401234567@sms"),
        ("<a@x.test; (040) 123-4567@sms>", "a@x.test;0401234567@sms"),
        ('<a@x.test; "040 123 4567"@sms>', "a@x.test;0401234567@sms"),
        ("<+358 (0)40 123 4567@sms, a@x.test>", "+358401234567@sms;a@x.test"),
        ("a@x.test; b@y.test", "a@x.test;b@y.test"),
        ("<a@x.test; b@y.test> NOTIFY=NEVER", "a@x.test;b@y.test"),
        ("<a@x.test;>", "a@x.test"),
        ("<@relay.example,@other.example:a@x.test>", "a@x.test"),  # source route: RFC 5321 says ignore it
    ],
)
def test_rcpt_lists_keep_every_member(typed: str, stored: str) -> None:
    assert stored == parse_rcpt(typed)[0]


@pytest.mark.parametrize("typed", ["<a@x.test; a@@b.fi>", "<a@x.test; @x.fi>", "<;>"])
def test_a_list_with_a_malformed_member_is_refused_whole(typed: str) -> None:
    """Refused at RCPT so the client sees it; accepting the rest would drop that member silently."""
    assert (None, None) == parse_rcpt(typed)


def test_a_phone_number_in_copy_to_is_sent_as_sms() -> None:
    data = {"upstreams": {"main": {"host": "smtp.example.com"}},
            "sms": {"gateway": "sms-{number}@gw.example", "domain": "sms.local"},
            "company": {"upstream": "main", "from_address": "erp@firma.fi", "copy_to": "a@firma.fi; 0401234567@sms.local",
                        "copy_to_mode": "cc"}}  # fmt: skip
    config = parse_config(yaml.safe_dump(data))
    out = prepare(config, Submission("erp@firma.fi", ("b@example.com",), b"Subject: x\r\n\r\ny\r\n", "127.0.0.1"))
    [mail, sms] = out.messages
    assert ("b@example.com", "a@firma.fi") == mail.recipients
    assert b"0401234567@sms.local" not in mail.content  # not written into Cc: it is not a mail address
    assert ("sms-+358401234567@gw.example",) == sms.recipients


def test_a_copy_to_at_the_sms_domain_must_be_a_phone_number() -> None:
    data = {"upstreams": {"main": {"host": "smtp.example.com"}},
            "sms": {"gateway": "sms-{number}@gw.example", "domain": "sms.local"},
            "company": {"upstream": "main", "copy_to": "12@sms.local"}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"company\.copy_to: 12@sms.local is at the SMS domain but is not a phone number"):
        parse_config(yaml.safe_dump(data))


def test_a_number_only_in_the_to_header_is_named_in_the_notes() -> None:
    """Python's smtplib sends ``RCPT TO:<a@x.test>`` for ``"a@x.test; 0401234567@sms"``: the number never
    reaches relay as a recipient, so no SMS can be sent, but the log says so instead of nothing."""
    data = {"upstreams": {"main": {"host": "smtp.example.com"}}, "sms": {"gateway": "sms-{number}@gw.example"},
            "company": {"upstream": "main", "from_address": "erp@firma.fi"}}  # fmt: skip
    config = parse_config(yaml.safe_dump(data))
    content = b"To: a@x.test; 0401234567@sms; 050 111 2222@sms\r\nSubject: x\r\n\r\ny\r\n"
    out = prepare(config, Submission("erp@firma.fi", ("a@x.test", "+358501112222@sms"), content, "127.0.0.1"))
    notes = [n for m in out.messages for n in m.notes if "no SMS" in n]
    assert ["To names 0401234567@sms but the client did not send it as a recipient: no SMS"] == notes


@pytest.mark.parametrize(("typed", "parsed"), [("", ("", "")), ("  ", ("", "")), ("0@[", (None, None)), ("<a@[>", (None, None))])
def test_what_the_email_parser_chokes_on_is_a_syntax_error_not_a_crash(typed: str, parsed: tuple[str, str]) -> None:
    assert parsed == parse_rcpt(typed)


_RCPT_CHARACTERS = st.sampled_from(list('<>;,"() @+-.:\\\t[]=') + list("abcs0123456789") + ["\x00", "ä", "\u2028"])


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(_RCPT_CHARACTERS, max_size=60))
@example("0@[ ")  # the stdlib's addr-spec parser raised UnboundLocalError (found by this test, 2026-12-07)
def test_any_rcpt_argument_is_parsed_or_refused_never_a_crash(typed: str) -> None:
    """The listener's RCPT parsing and checking over arbitrary text (30,000 examples ran clean once)."""
    config = parse_config(yaml.safe_dump({"upstreams": {"m": {"host": "smtp.example.com"}}, "company": {"upstream": "m"},
                                          "sms": {"gateway": "{number}@gw.example"}}))  # fmt: skip
    address, _params = parse_rcpt(typed)
    if address:
        try:
            check_recipient(address, config)
        except RefusedError:
            pass


def test_a_recipient_rule_that_names_a_phone_number_sends_an_sms() -> None:
    """A rule may point an address at a phone (the boss wants invoices as SMS): an SMS, not mail to ``@sms``."""
    data = {"upstreams": {"main": {"host": "smtp.example.com"}},
            "sms": {"gateway": "sms-{number}@gw.example"},
            "rewrite": {"recipient_rules": [{"match": "pomo@firma.fi", "replace": "+358401111111@sms"}]},
            "company": {"upstream": "main", "from_address": "erp@firma.fi"}}  # fmt: skip
    config = parse_config(yaml.safe_dump(data))
    out = prepare(config, Submission("erp@firma.fi", ("pomo@firma.fi;b@example.com",), b"Subject: x\r\n\r\ny\r\n", "127.0.0.1"))
    assert [("mail", ("b@example.com",)), ("sms", ("sms-+358401111111@gw.example",))] == [
        (m.kind, m.recipients) for m in out.messages
    ]


def test_a_phone_number_in_copy_to_at_the_default_sms_domain() -> None:
    """``copy_to: +358409999999@sms`` (the seeds' default recipient as a phone, at the default domain) is
    taken by the config and sent as SMS; without an sms: section the config says why it cannot be."""
    company = {"upstream": "main", "from_address": "erp@firma.fi", "copy_to": "+358409999999@sms"}
    data = {"upstreams": {"main": {"host": "smtp.example.com"}}, "sms": {"gateway": "sms-{number}@gw.example"},
            "company": company}  # fmt: skip
    out = prepare(parse_config(yaml.safe_dump(data)),
                  Submission("erp@firma.fi", ("b@example.com",), b"Subject: x\r\n\r\ny\r\n", "127.0.0.1"))  # fmt: skip
    assert ["mail", "sms"] == [m.kind for m in out.messages]
    assert ("sms-+358409999999@gw.example",) == out.messages[1].recipients

    del data["sms"]
    with pytest.raises(ConfigError, match=r"company\.copy_to: \+358409999999@sms is a phone number for SMS, but the sms: section is off"):
        parse_config(yaml.safe_dump(data))
