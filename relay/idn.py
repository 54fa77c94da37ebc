"""Internationalised domains in the forms a 7-bit world can carry: the A-label (RFC 5890).

An ERP's customer at ``yhtiö.fi`` must be reachable through a provider that does not offer SMTPUTF8 and
named in a header that has to stay 7-bit; both take the domain as its A-label (``xn--yhti-8qa.fi``), which
reaches the same mailbox. The rewrite, the notices, the SMTP transport and the Graph transport all need the
one conversion, so it lives here, below every stage.
"""

from __future__ import annotations

import idna


def ascii_domain(domain: str) -> str | None:
    """A domain as a 7-bit header or an upstream without SMTPUTF8 can hold it: an internationalised one
    as its A-label (IDNA2008 with the UTS #46 mapping, non-transitional, as Postfix converts it:
    ``yhtiö.fi`` -> ``xn--yhti-8qa.fi``), an ASCII one as it is; ``None`` for one IDNA refuses."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return None


def with_a_label(address: str) -> str:
    """``info@yhtiö.fi`` as ``info@xn--yhti-8qa.fi``; a non-ASCII local part or a domain IDNA refuses has
    no such form, and the address is returned as it is."""
    local, at, domain = address.rpartition("@")
    ascii_ = ascii_domain(domain) if at and local.isascii() else None
    return f"{local}@{ascii_}" if ascii_ else address
