"""Every SMTP reply relay sends, named by its code (``R250_QUEUED``), in one catalog.

Names carry the code so a reader sees the class without looking it up; ``tests/test_replies.py``
checks that each name, code and enhanced status code agree (aiosmtpd's ``qa/test_1testsuite.py``).
Replies with a ``{}`` placeholder are formatted by the caller.

aiosmtpd answers some errors itself, without an enhanced status code (``501 Syntax: RCPT TO:
<address>``, ``503 Error: need MAIL command``, ``500 Error: command "X" not recognized``);
``with_enhanced_code`` gives those one (RFC 3463, the codes Postfix uses for the same replies), so
every 4xx and 5xx relay sends carries one and a client's log can be read the same way for all of them.
"""

import re

R220_READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
R250_QUEUED = "250 2.0.0 Ok: queued as {}"
R421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
R421_TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections from {}, try again later"
R450_TOO_MUCH_MAIL = "450 4.7.1 Error: too much mail from {}, try again later"
R450_TOO_MUCH_MAIL_FROM_USER = "450 4.7.1 Error: too much mail from user {}, try again later"
R451_SPOOL_WRITE = "451 4.3.0 Temporary failure: the message could not be stored safely, try again later"
R451_INTERNAL = "451 4.3.0 Temporary internal error, try again later"
R451_SMS_SECRET = "451 4.3.5 The SMS service password cannot be read, try again later"
R451_NO_UPSTREAM = "451 4.3.5 No upstream account is configured for this sender, try again later"
R452_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients (at most {} per message)"
R452_INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage: the mail queue's disk is nearly full, try again later"
R454_TLS_UNAVAILABLE = "454 4.7.0 TLS not available"
R500_AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
R501_BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax: {}"
R501_BAD_SENDER = "501 5.1.7 Bad sender address syntax: {}"
R501_STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
R501_AUTH_PARAM = "501 5.5.4 Syntax: AUTH=<mailbox> as xtext, or AUTH=<>"
R503_TLS_ACTIVE = "503 5.5.1 Error: TLS already active"
R530_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
R535_BAD_LOGIN = "535 5.7.8 Authentication credentials invalid"
R550_UNKNOWN_USER = "550 5.7.1 Sender is not a known user of this relay"
R550_USER_REJECTED = "550 5.7.1 This user does not send mail through relay"
R550_DISABLED = "550 5.7.1 Sending mail through relay is switched off for this company"
R550_BAD_PHONE_NUMBER = "550 5.1.1 Not a valid phone number for SMS: {}"
R550_SMS_OFF = "550 5.1.2 SMS sending is not set up in relay (sms: section): {}"
R552_TOO_BIG = "552 5.3.4 Message too big (at most {} bytes)"
R552_TOO_BIG_FOR_GRAPH = "552 5.3.4 Message too big for this account's Microsoft Graph upstream (at most about {} KB)"
R552_GRAPH_NEEDS_READWRITE = (
    "552 5.3.4 Message too big for Microsoft Graph sendMail (at most about {} KB); bigger messages need the "
    "Mail.ReadWrite permission, which this account's app lacks: ask the admin to grant it"
)
R553_GRAPH_ADDRESS = "553 5.1.3 Microsoft Graph would refuse this recipient ({}): {}"
# relay's own refusals at delivery, recorded as a recipient's reply: the provider was never asked
R553_NO_SMTPUTF8 = "553 5.6.7 non-ASCII address, and the upstream does not offer SMTPUTF8 (RFC 6531)"
R553_NOT_IDN = ("553 5.6.7 the domain is not a valid internationalised domain name (IDNA2008): it has no ASCII "
                "form, and the upstream does not offer SMTPUTF8 (RFC 6531)")  # fmt: skip
DELIVERY_REFUSALS = (R553_NO_SMTPUTF8, R553_NOT_IDN)
R554_NOT_ALLOWED = "554 5.7.1 Relay access denied: your address {} may not send through this relay"
R554_BAD_MESSAGE = "554 5.6.0 Message cannot be relayed: {}"

# RFC 3463 codes for the bare 4xx/5xx replies aiosmtpd sends itself, by reply code (as Postfix answers
# the same errors: 500 5.5.2 syntax error, 501 5.5.4 bad arguments, 503 5.5.1 bad sequence of commands)
ENHANCED_BY_CODE = {
    421: "4.3.2", 450: "4.0.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 535: "5.7.8",
    538: "5.7.11", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.7.0", 555: "5.5.4",
}  # fmt: skip
_HAS_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?:\s|$)")


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an enhanced status code after its code, if it is a 4xx or 5xx without one."""
    code, separator, text = reply[:3], reply[3:4], reply[4:]
    if not (code.isdigit() and code[0] in "45") or separator not in (" ", "-", "") or _HAS_ENHANCED.match(text):
        return reply
    enhanced = ENHANCED_BY_CODE.get(int(code), f"{code[0]}.0.0")
    return f"{code}{separator or ' '}{enhanced}" + (f" {text}" if text else "")
