"""Peak memory of relay relaying one big message, against the message size. Prints; asserts nothing.

    .venv/bin/python bench/memory.py [--size-mb 25] [--signature]

relay runs as its own process (spool fsync on) delivering to a STARTTLS + AUTH upstream. The figure is
the growth of relay's peak resident memory (VmHWM) from idle to after the message was delivered,
divided by the message size. ``--signature`` makes the rewrite stage change the body (the text part
gets the signature: a MIME parse and re-serialisation, with the big attachment standing aside, see
relay/skeleton.py) instead of only the header block. Measured 2026-12-06: 1.05x (25 MB), and with
``--signature`` 1.08x (25 MB), 1.13x (10 MB); before the stand-ins, 9.85x with a signature.
"""

from __future__ import annotations

import argparse
import base64
import os
import smtplib
import ssl
import sys
import tempfile
import time
from pathlib import Path

import trustme
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import PASSWORD, USER, relay_pids, start_relay, wait_for
from relay import logs
from tests.servers import Upstream


def vm(pid: int, key: str) -> int:
    """``key`` (VmRSS, VmHWM) summed over relay's processes (an upper bound for VmHWM: the two peaks
    need not coincide)."""
    total = 0
    for each in relay_pids(pid):
        lines = [line for line in Path(f"/proc/{each}/status").read_text().splitlines() if line.startswith(key + ":")]
        total += int(lines[0].split()[1]) * 1024
    return total


def big_message(size: int) -> bytes:
    attachment = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        b"From: erp@legacy.local\r\nTo: c@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
        b"Invoice attached.\r\n--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="invoice.pdf"\r\n\r\n' + attachment + b"--b--\r\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=25)
    parser.add_argument("--signature", action="store_true")
    args = parser.parse_args()
    logs.configure(level="warning")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    work = Path(tempfile.mkdtemp(prefix="relay-mem-"))
    (work / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (work / "pw").write_text(PASSWORD)
    os.chmod(work / "pw", 0o600)
    up = Upstream("mem", security="starttls", server_context=server_ctx, accounts={USER: PASSWORD}).start()
    company = {"from_address": USER, "upstream": "mem"}
    if args.signature:
        company["signature"] = "--\nRakennus Oy"
    config = work / "relay.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "spool_dir": str(work / "spool"),
        "upstreams": {"mem": {"host": "127.0.0.1", "port": up.port, "security": "starttls", "username": USER,
                              "password_file": str(work / "pw"), "ca_file": str(work / "ca.pem")}},
        "company": company,
        "limits": {"max_message_size": "200M"},
        "logging": {"level": "warning", "format": "json"},
    }))  # fmt: skip
    relay, port = start_relay(config)
    message = big_message(int(args.size_mb * 1024 * 1024))
    time.sleep(0.5)
    idle = vm(relay.pid, "VmRSS")
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.sendmail("erp@legacy.local", ["c@example.com"], message)
    accepted = time.monotonic() - started
    wait_for(up, 1, timeout=120)
    total = time.monotonic() - started
    peak = vm(relay.pid, "VmHWM")
    relay.terminate()
    relay.wait(60)
    up.close()
    size = len(message)
    print(f"message {size / 2**20:.1f} MiB  signature={args.signature}  accepted in {accepted:.2f}s, "
          f"delivered in {total:.2f}s")  # fmt: skip
    print(f"relay RSS idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB: "
          f"growth {(peak - idle) / 2**20:.1f} MiB = {(peak - idle) / size:.2f} x the message size")


if __name__ == "__main__":
    main()
