"""End-to-end throughput of relay against a baseline, in one invocation. Prints numbers; asserts nothing.

    .venv/bin/python bench/throughput.py [--messages 300] [--clients 1 10] [--size 2048] [--archive] [--metrics]

Load: N concurrent legacy clients (smtplib, no TLS, no AUTH), each sending its share of messages.
Path measured: client -> relay (its own process, spool fsync on) -> upstream with STARTTLS + AUTH, timed until the
upstream has received every message. Baseline: the same clients sending straight to the same
upstream over STARTTLS + AUTH (what the ERP would do if it could). The upstream is a Python aiosmtpd
server, so it bounds both figures; see issue 4 for the Postfix side-by-side. ``--archive`` has relay
keep a Maildir copy of every message (``archive_days``), ``--metrics`` serves /metrics: their cost.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trustme
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay import logs
from tests.servers import Upstream

USER, PASSWORD = "bench@relay.test", "bench-password"


def message(size: int, n: int) -> bytes:
    head = f"From: erp@legacy.local\r\nTo: c@example.com\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def blast(port: int, clients: int, count: int, size: int, *, tls_auth: ssl.SSLContext | None) -> None:
    def one_client(k: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            if tls_auth is not None:
                smtp.starttls(context=tls_auth)
                smtp.login(USER, PASSWORD)
            for n in range(k, count, clients):
                sender = USER if tls_auth is not None else "erp@legacy.local"
                smtp.sendmail(sender, ["c@example.com"], message(size, n))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))


def wait_for(up: Upstream, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(up.received) < count and time.monotonic() < deadline:
        time.sleep(0.005)


def relay_pids(pid: int) -> list[int]:
    """relay serve and its intake process (its children, from /proc)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time relay has used so far, over both its processes (Linux /proc)."""
    total = 0.0
    for each in relay_pids(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        if os.environ.get("RELAY_BENCH_DEBUG"):
            print(f"pid {each} user/sys seconds:", int(fields[11]) / os.sysconf("SC_CLK_TCK"),
                  int(fields[12]) / os.sysconf("SC_CLK_TCK"))  # fmt: skip
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_relay(config_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """relay as its own process (as in production), listening on a port we pick."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = config_path.read_text().replace("port: 0", f"port: {port}", 1)
    config_path.write_text(text)
    proc = subprocess.Popen([sys.executable, *os.environ.get("RELAY_BENCH_PYFLAGS", "").split(), "-m", "relay", "serve", "-c", str(config_path)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("relay did not start")


def run(args: argparse.Namespace) -> None:
    logs.configure(level="warning")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    (work / "ca.pem").write_bytes(ca.cert_pem.bytes())
    secret = work / "pw"
    secret.write_text(PASSWORD)
    os.chmod(secret, 0o600)
    up = Upstream("bench", security="starttls", server_context=server_ctx, accounts={USER: PASSWORD}).start()
    print(f"{'clients':>7} {'size':>8} {'messages':>8} {'direct msg/s':>13} {'accepted/s':>12} {'relay msg/s':>12}"
          f" {'ratio':>6} {'relay CPU ms/msg':>10}")  # fmt: skip
    for clients in args.clients:
        up.received.clear()
        started = time.monotonic()
        blast(up.port, clients, args.messages, args.size, tls_auth=client_ctx)
        wait_for(up, args.messages)
        direct = args.messages / (time.monotonic() - started)

        config_path = work / f"relay-{clients}.yaml"
        config_path.write_text(yaml.safe_dump({
            "listeners": [{"address": "127.0.0.1", "port": 0}],
            "spool_dir": str(work / f"spool-{clients}"),
            "upstreams": {"bench": {"host": "127.0.0.1", "port": up.port, "security": "starttls",
                                    "username": USER, "password_file": str(secret), "ca_file": str(work / "ca.pem")}},
            "company": {"from_address": USER, "upstream": "bench"},
            "delivery": {"workers": args.workers},
            "logging": {"level": "warning", "format": "json"},
            **_optional_sections(args, work / f"archive-{clients}"),
        }))  # fmt: skip
        relay, port = start_relay(config_path)
        up.received.clear()
        started = time.monotonic()
        blast(port, clients, args.messages, args.size, tls_auth=None)
        accepted = args.messages / (time.monotonic() - started)
        wait_for(up, args.messages)
        through = args.messages / (time.monotonic() - started)
        cpu = process_cpu_seconds(relay.pid)
        relay.terminate()
        relay.wait(60)
        print(f"{clients:>7} {args.size:>8} {args.messages:>8} {direct:>13.1f} {accepted:>12.1f} {through:>12.1f}"
              f" {through / direct:>6.2f} {cpu / args.messages * 1000:>10.2f}")  # fmt: skip
    up.close()


def _optional_sections(args: argparse.Namespace, archive: Path) -> dict[str, object]:
    sections: dict[str, object] = {}
    if args.archive:
        sections["archive"] = {"dir": str(archive)}
        sections["company"] = {"from_address": USER, "upstream": "bench", "archive_days": 1}
    if args.metrics:
        sections["metrics"] = {"address": "127.0.0.1", "port": 0}
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--archive", action="store_true", help="archive every message (Maildir copy)")
    parser.add_argument("--metrics", action="store_true", help="serve /metrics (on a free loopback port)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
