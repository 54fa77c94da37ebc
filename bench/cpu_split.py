"""Where the machine's CPU goes during one round of the shared harness: relay's two processes, the
upstream Postfix, smtp-source, the rest; per message, with the machine's busy share.

    .venv/bin/python bench/cpu_split.py [--rounds 1] [-n 2000] [--size 2k|1mb]
        [--harness ../shared/bench] [--work ../bench]

The ratio to Postfix that the harness reports is, on a machine whose two cores are busy, close to
(Postfix's CPU + the upstream's + the client's) / (relay's + the upstream's + the client's): this shows
each term, and whether the machine was busy (CPU-bound) or idle in part (something waits: a disk sync,
a reply). It samples every task in /proc twice a second, so the CPU of a process that starts and exits
between two samples is missed (Postfix reuses its processes: little is). Asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import add_round_options, messages, one_round  # scripts beside this one
from side_by_side import ROOT, harness_env

TICKS = 100  # clock ticks a second in /proc's times (USER_HZ, 100 on Linux)
POSTFIX = {"smtpd", "cleanup", "qmgr", "discard", "trivial-rewrite", "master", "postlogd", "tlsmgr", "anvil",
           "proxymap", "pickup", "smtp", "scache", "bounce"}  # fmt: skip


CLIENT = "smtp-source (the client)"


def group(pid: str, comm: str) -> str:
    """Which part of the benchmark a task belongs to."""
    if comm in POSTFIX:
        return "upstream Postfix"
    if comm.startswith(("dovecot", "auth")):
        return "upstream Dovecot (AUTH)"
    if comm == "smtp-source":
        return CLIENT
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "other"
    if b"relay intake-process" in command:
        return "relay intake process"
    if b"relay serve" in command:
        return "relay daemon (delivery)"
    if b"bench.py" in command:
        return "the harness"
    return "other"


class Sampler(threading.Thread):
    """CPU seconds per group, and the machine's busy share, while smtp-source runs (the load itself, not
    the services' start-up and shutdown): from every task's utime and stime, twice a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first: dict[str, tuple[str, int]] = {}  # task -> (group, ticks when first seen in the window)
        self.last: dict[str, tuple[str, int]] = {}
        self.machine: list[tuple[int, int]] = []  # (all, idle) at the window's first and last samples
        self.done = threading.Event()
        self.ended = False

    def snapshot(self) -> None:
        tasks: dict[str, tuple[str, int]] = {}
        for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            tasks[str(stat.parent)] = (group(stat.parts[2], comm), int(fields[11]) + int(fields[12]))
        loaded = any(name == CLIENT for name, _ in tasks.values())
        if self.ended or (not loaded and not self.first):
            return
        for key, value in tasks.items():
            self.first.setdefault(key, value)
            self.last[key] = value
        self.machine[1:] = [busy_share()] if self.machine else []
        if not self.machine:
            self.machine.append(busy_share())
        self.ended = not loaded  # the first sample after the client exited closes the window

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.snapshot()

    def stop(self) -> tuple[dict[str, float], float]:
        self.done.set()
        self.join()
        seconds: dict[str, float] = collections.Counter()
        for key, (name, ticks) in self.last.items():
            seconds[name] += (ticks - self.first[key][1]) / TICKS
        if len(self.machine) < 2:
            return dict(seconds), float("nan")
        (total0, idle0), (total1, idle1) = self.machine
        return dict(seconds), 100 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def busy_share() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]  # all, idle + iowait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_options(parser, rounds=1)
    args = parser.parse_args()
    n, (work, env) = messages(args), harness_env(args.harness, args.work)
    for number in range(1, args.rounds + 1):
        sampler = Sampler()
        sampler.start()
        got = one_round(work, env, ROOT, args.size, n)
        seconds, busy = sampler.stop()
        print(f"round {number}: {got['msg_s']:.1f} msg/s end to end; the machine {busy:.0f}% busy while the "
              f"client ran")  # fmt: skip
        for name, used in sorted(seconds.items(), key=lambda item: -item[1]):
            if used > 0:
                print(f"  {name:28} {1000 * used / n:6.2f} ms CPU a message  ({used:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
