"""Fuzz relay for a bounded time: hostile SMTP sessions against ``relay serve`` as its own process.

    .venv/bin/python bench/fuzz.py [--seconds 60] [--findings DIR]
    .venv/bin/python bench/fuzz.py --replay DIR/finding-1.pickle --port 2525   # play one again

The generators and checks are ``tests/fuzzing.py`` (the same as ``tests/test_fuzz.py``). relay runs
with JSON logs, every rewrite feature on and small limits, delivering to a local STARTTLS-less
implicit-TLS upstream that accepts everything. Each input is one session; after it a new connection
must get 220 and a NOOP 250. A finding is any reply that breaks the rules (``violations``), a
``session_error``/traceback/ERROR line in relay's log, a message the upstream got with a bare CR/LF
or a line over 998 octets, a 250 whose queue id is neither delivered nor in the spool at the end, or
relay dying. Each kind of finding is saved once (the first dialogue that showed it) as a pickle to
replay and a text file to read. Prints inputs tried, replies by code, findings, and relay's RSS.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pickle
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import trustme
import yaml
from hypothesis import HealthCheck, Phase, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.queue.spool import Spool
from tests.fuzzing import (
    Lines,
    Step,
    Transcript,
    dialogues,
    message_problems,
    play,
    relay_sections,
    violations,
)
from tests.servers import Upstream

USER, PASSWORD = "laskutus@rakennus.fi", "fuzz-secret-5e1d"
LOG_FAILURES = ("session_error", "delivery_crashed", "spool_write_failed", "queue_file_damaged")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Relay:
    """``python -m relay serve`` with its JSON log lines collected."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", env={**env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []  # stderr lines that are not JSON (a traceback printed raw)
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_for("relay_started")["listeners"][0].rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                with self.lock:
                    self.raw_lines.append(line)
                continue
            with self.lock:
                self.events.append(event)

    def wait_for(self, name: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [e for e in self.events if e.get("event") == name]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"relay did not log {name}: {''.join(self.raw_lines)[-2000:]}")

    def take(self) -> tuple[list[dict[str, Any]], list[str]]:
        with self.lock:
            events, raw = self.events, self.raw_lines
            self.events, self.raw_lines = [], []
        return events, raw

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Fuzzer:
    def __init__(self, relay: Relay, upstream: Upstream, spool: Spool, findings: Path) -> None:
        self.relay, self.upstream, self.spool, self.findings = relay, upstream, spool, findings
        self.inputs = 0
        self.codes: collections.Counter[int] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()  # finding kind -> times seen
        self.queued: set[str] = set()
        self.delivered: set[str] = set()
        self.checked_upstream = 0

    def run_one(self, dialogue: list[Step]) -> None:
        self.inputs += 1
        out = play(self.relay.port, dialogue)
        problems = violations(out)
        fresh = play(self.relay.port, [Lines((b"NOOP\r\n",))])
        if [ex.code for ex in fresh.exchanges] != [220, 250]:
            problems.append(f"a new connection afterwards got {[ex.code for ex in fresh.exchanges]}")
        self.codes.update(ex.code for ex in out.exchanges)
        self.queued.update(out.queued)
        problems += self._log_problems() + self._upstream_problems()
        if self.relay.proc.poll() is not None:
            problems.append(f"relay exited with {self.relay.proc.returncode}")
        for problem in problems:
            self._save(problem, dialogue, out)
        if self.relay.proc.poll() is not None:
            raise SystemExit("relay died; findings saved")

    def _log_problems(self) -> list[str]:
        events, raw = self.relay.take()
        problems = [f"relay printed a non-JSON line: {line.strip()[:200]}" for line in raw if line.strip()]
        for event in events:
            if event.get("event") == "delivery_attempt" and event.get("result") == "delivered":
                self.delivered.add(str(event.get("queue_id")))
            if event.get("event") in LOG_FAILURES or "exception" in event or "exc_info" in event:
                problems.append(f"relay logged {event.get('event')}: {str(event.get('error') or event.get('exception'))[:300]}")
        return problems

    def _upstream_problems(self) -> list[str]:
        received = self.upstream.received[self.checked_upstream :]
        self.checked_upstream += len(received)
        return [f"the upstream got a message with {p}" for r in received for p in message_problems(r.content)]

    def _save(self, problem: str, dialogue: list[Step], out: Transcript) -> None:
        kind = re.sub(r"b'.*?'|\"[^\"]*\"|'[^']*'|\d+", "_", problem)[:160]
        self.kinds[kind] += 1
        if self.kinds[kind] > 1:
            return
        n = len(self.kinds)
        (self.findings / f"finding-{n}.pickle").write_bytes(pickle.dumps(dialogue))
        transcript = "\n".join(f"  {ex.sent[:300]!r}\n    -> {b''.join(ex.reply)[:600]!r}" for ex in out.exchanges)
        (self.findings / f"finding-{n}.txt").write_text(f"{problem}\n\ndialogue: {dialogue!r}\n\ntranscript:\n{transcript}\n")
        print(f"finding {n}: {problem}", flush=True)

    def final_check(self, timeout: float = 60) -> None:
        """Every 250 id must end delivered or be in the spool (waiting for a retry, or failed)."""
        deadline = time.monotonic() + timeout
        missing = self.queued
        while time.monotonic() < deadline:
            self._log_problems()
            missing = {i for i in self.queued - self.delivered if self.spool.find(i) is None}
            if not missing:
                return
            time.sleep(0.5)
        for queue_id in sorted(missing):
            self.kinds[f"250 for {queue_id}, neither delivered nor in the spool"] += 1


def setup(work: Path) -> tuple[Upstream, Path]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    (work / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (work / "pw").write_text(PASSWORD)
    os.chmod(work / "pw", 0o600)
    up = Upstream("fuzz", security="ssl", server_context=context, accounts={USER: PASSWORD}).start()
    account = {"host": "127.0.0.1", "port": up.port, "security": "ssl", "username": USER,
               "password_file": str(work / "pw"), "ca_file": str(work / "ca.pem")}  # fmt: skip
    config = {
        "listeners": [{"address": "127.0.0.1", "port": 0}], "spool_dir": str(work / "spool"),
        "secret_store": str(work / "secrets"), **relay_sections(account),
        "delivery": {"retry_interval": 5, "max_retry_interval": 30, "notices": False},
        "logging": {"format": "json", "level": "info"},
    }  # fmt: skip
    path = work / "relay.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return up, path


def fuzz(seconds: float, findings: Path) -> None:
    warnings.filterwarnings("ignore", module="aiosmtpd")  # the test upstream's own AUTH-without-TLS notes
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="relay-fuzz-"))
    findings.mkdir(parents=True, exist_ok=True)
    up, config = setup(work)
    relay = Relay(config)
    fuzzer = Fuzzer(relay, up, Spool(work / "spool"), findings)
    play(relay.port, [Lines((b"NOOP\r\n",))])
    rss_before = rss(relay.proc.pid)
    deadline = time.monotonic() + seconds

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(dialogues())
    def one(dialogue: list[Step]) -> None:
        if time.monotonic() < deadline:
            fuzzer.run_one(dialogue)

    started = time.monotonic()
    while time.monotonic() < deadline:
        one()
    elapsed = time.monotonic() - started
    rss_after = rss(relay.proc.pid)
    fuzzer.final_check()
    relay.stop()
    up.close()
    report(fuzzer, elapsed, rss_before, rss_after, findings)


def report(fuzzer: Fuzzer, elapsed: float, rss_before: int, rss_after: int, findings: Path) -> None:
    print(f"inputs tried: {fuzzer.inputs} sessions in {elapsed:.0f} s ({fuzzer.inputs / elapsed:.1f}/s)")
    print("replies by code: " + ", ".join(f"{c}: {n}" for c, n in sorted(fuzzer.codes.items())))
    print(f"messages queued (250): {len(fuzzer.queued)}; delivered: {len(fuzzer.delivered)}; "
          f"upstream got {fuzzer.checked_upstream}")  # fmt: skip
    print(f"relay RSS: {rss_before / 2**20:.1f} MB before, {rss_after / 2**20:.1f} MB after")
    print(f"findings: {len(fuzzer.kinds)} kinds" + (f" (reproducers in {findings})" if fuzzer.kinds else ""))
    for kind, count in fuzzer.kinds.most_common():
        print(f"  {count:6} x {kind}")


def replay(path: Path, port: int) -> None:
    dialogue = pickle.loads(path.read_bytes())  # a file this script wrote
    out = play(port, dialogue)
    for ex in out.exchanges:
        print(f"{ex.sent[:300]!r}\n  -> {b''.join(ex.reply)!r}")
    print("\n".join(violations(out)) or "no violations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--replay", type=Path, help="play a saved finding against --port")
    parser.add_argument("--port", type=int, default=2525)
    args = parser.parse_args()
    if args.replay:
        replay(args.replay, args.port)
    else:
        fuzz(args.seconds, args.findings)


if __name__ == "__main__":
    main()
