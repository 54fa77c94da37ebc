"""Peak memory of relay relaying one big message, against the message size. Prints; asserts nothing.

    .venv/bin/python bench/memory.py [--size-mb 25] [--signature] [--graph [--resume]]

relay runs as its own process (spool fsync on) delivering to a STARTTLS + AUTH upstream, or with
``--graph`` to the Graph emulator of the tests (HTTPS; a token with Mail.Send and Mail.ReadWrite), where
a message over 3 MB takes the draft route (draft, upload session, send); ``--resume`` answers the upload's
second range with 429 + Retry-After: 1, so the upload resumes from nextExpectedRanges. The figure is
the growth of relay's peak resident memory (VmHWM) from idle to after the message was delivered,
divided by the message size. With ``--graph`` the peak is also shown per phase: receiving and preparing
(up to the 250), then, the peak reset (``/proc/PID/clear_refs``), planning, uploading, resuming and
sending. ``--signature`` makes the rewrite stage change the body (the text part
gets the signature: a MIME parse and re-serialisation, with the big attachment standing aside, see
relay/skeleton.py) instead of only the header block. Measured 2026-12-06: 1.05x (25 MB), and with
``--signature`` 1.08x (25 MB), 1.13x (10 MB); before the stand-ins, 9.85x with a signature. With
``--graph`` (2026-12-07): 30 MB 1.03x receiving, 1.03x delivering (1.04x with ``--resume``); 10 MB 1.13x,
1.62x (1.73x).
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
from typing import Any

import trustme
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import PASSWORD, USER, relay_pids, start_relay, wait_for
from relay import logs
from tests.servers import Upstream


def vm(pid: int, key: str) -> int:
    """``key`` (VmRSS, VmHWM) summed over relay's processes (an upper bound for VmHWM: the two peaks
    need not coincide)."""
    return sum(each(pid, key).values())


def each(pid: int, key: str) -> dict[str, int]:
    """``key`` per process: ``delivery`` (relay serve) and ``intake`` (its child)."""
    out = {}
    for number, each_pid in enumerate(relay_pids(pid)):
        lines = [line for line in Path(f"/proc/{each_pid}/status").read_text().splitlines() if line.startswith(key + ":")]
        out["delivery" if number == 0 else f"intake{'' if number == 1 else number}"] = int(lines[0].split()[1]) * 1024
    return out


def big_message(size: int) -> bytes:
    attachment = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        b"From: erp@legacy.local\r\nTo: c@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
        b"Invoice attached.\r\n--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="invoice.pdf"\r\n\r\n' + attachment + b"--b--\r\n"
    )


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux 4.0+), so the next phase's peak is its own."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def graph_upstream(work: Path, ca: trustme.CA, server_ctx: ssl.SSLContext, *, resume: bool) -> tuple[Any, dict[str, Any]]:
    """The tests' token endpoint and Graph emulator, and relay's account for them."""
    from tests.oauth_servers import GraphServer, TokenServer

    tokens = TokenServer(server_ctx, roles=("Mail.Send", "Mail.ReadWrite"))
    tokens.clients["app-1"] = "bench-secret"
    graph = GraphServer(server_ctx, valid=tokens.valid)
    if resume:
        graph.put_faults[2] = (429, {"Retry-After": "1"})
    (work / "client-secret").write_text("bench-secret")
    os.chmod(work / "client-secret", 0o600)
    account = {"type": "graph", "host": "127.0.0.1", "port": graph.port, "username": USER, "ca_file": str(work / "ca.pem"),
               "oauth2": {"provider": "microsoft", "tenant": "yritys.onmicrosoft.com", "client_id": "app-1",
                          "token_url": tokens.url, "client_secret_file": str(work / "client-secret")}}  # fmt: skip
    graph.closers = (tokens, graph)
    return graph, account


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=25)
    parser.add_argument("--signature", action="store_true")
    parser.add_argument("--graph", action="store_true", help="deliver through the Graph emulator (draft route)")
    parser.add_argument("--resume", action="store_true", help="with --graph: a 429 in the middle of the upload")
    args = parser.parse_args()
    logs.configure(level="warning")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    work = Path(tempfile.mkdtemp(prefix="relay-mem-"))
    (work / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (work / "pw").write_text(PASSWORD)
    os.chmod(work / "pw", 0o600)
    graph: Any = None
    if args.graph:
        graph, mem = graph_upstream(work, ca, server_ctx, resume=args.resume)
    else:
        up = Upstream("mem", security="starttls", server_context=server_ctx, accounts={USER: PASSWORD}).start()
        mem = {"host": "127.0.0.1", "port": up.port, "security": "starttls", "username": USER,
               "password_file": str(work / "pw"), "ca_file": str(work / "ca.pem")}  # fmt: skip
    company = {"from_address": USER, "upstream": "mem"}
    if args.signature:
        company["signature"] = "--\nRakennus Oy"
    config = work / "relay.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "spool_dir": str(work / "spool"),
        "upstreams": {"mem": mem},
        "company": company,
        "limits": {"max_message_size": "200M"},
        "logging": {"level": "warning", "format": "json"},
    }))  # fmt: skip
    relay, port = start_relay(config)
    message = big_message(int(args.size_mb * 1024 * 1024))
    time.sleep(0.5)
    idle = vm(relay.pid, "VmRSS")
    idle_each = each(relay.pid, "VmRSS")
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.sendmail("erp@legacy.local", ["c@example.com"], message)
    accepted = time.monotonic() - started
    received_peak = vm(relay.pid, "VmHWM")
    phases = args.graph and reset_peak(relay.pid)
    at_reset = vm(relay.pid, "VmRSS")
    if args.graph:
        graph.wait_for(1, timeout=120)
        for server in graph.closers:
            server.close()
    else:
        wait_for(up, 1, timeout=120)
    total = time.monotonic() - started
    peak = vm(relay.pid, "VmHWM")
    peak_each = each(relay.pid, "VmHWM")
    relay.terminate()
    relay.wait(60)
    if not args.graph:
        up.close()
    size = len(message)
    if phases:
        print(f"receiving and preparing: peak growth {(received_peak - idle) / 2**20:.1f} MiB = "
              f"{(received_peak - idle) / size:.2f} x; planning, uploading{', resuming' if args.resume else ''} and "
              f"sending: {(peak - idle) / 2**20:.1f} MiB = {(peak - idle) / size:.2f} x (RSS at the 250: "
              f"{(at_reset - idle) / 2**20:.1f} MiB over idle)")  # fmt: skip
        peak = max(peak, received_peak)
    print(f"message {size / 2**20:.1f} MiB  signature={args.signature}  accepted in {accepted:.2f}s, "
          f"delivered in {total:.2f}s")  # fmt: skip
    for name, value in peak_each.items():
        grown = value - idle_each.get(name, value)
        print(f"  {name}: idle {idle_each.get(name, 0) / 2**20:.1f} MiB, peak {value / 2**20:.1f} MiB, "
              f"growth {grown / 2**20:.1f} MiB = {grown / size:.2f} x")
    print(f"relay RSS idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB: "
          f"growth {(peak - idle) / 2**20:.1f} MiB = {(peak - idle) / size:.2f} x the message size")


if __name__ == "__main__":
    main()
