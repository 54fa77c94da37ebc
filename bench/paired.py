"""This checkout against an earlier commit, in alternating rounds of the shared harness: a change's cost.

    .venv/bin/python bench/paired.py BASE [--rounds 3] [-n 2000] [--size 2k|1mb]
        [--harness ../shared/bench] [--work ../bench]

On a shared machine the same code's throughput moves by a third between runs a few minutes apart, so a
change is judged by rounds that alternate the two versions within one invocation: BASE (any commit,
checked out with ``git worktree`` into a temporary directory) and this checkout, each round the
harness's ``external:relay`` target (``smtp-source`` at 10 sessions, STARTTLS + AUTH to its upstream
Postfix) with relay's code taken from one tree or the other (``PYTHONPATH``; the installed entry points
and dependencies are this checkout's ``.venv``). Prints each round (end-to-end msg/s, relay's CPU per
message over both its processes, the machine's load) and the medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import ROOT, harness_env  # a script beside this one


def round_args(size: str, n: int) -> list[str]:
    if size == "1mb":
        return ["relay1mb", "--targets", "external:relay", "--n1mb", str(n), "--no-refs", "--concs", "10", "--reps", "1"]
    return ["relay", "--targets", "external:relay", "-n", str(n), "--no-refs", "--concs", "10", "--reps", "1"]


def one_round(work: Path, env: dict[str, str], code: Path, size: str, n: int) -> dict[str, float]:
    """One harness run of relay with its code from ``code``; its figures, from the result file it saved."""
    before = set((work / "results").glob("*.json"))
    python = str(work / ".venv" / "bin" / "python")
    subprocess.run([python, "bench.py", *round_args(size, n)], cwd=work, env={**env, "PYTHONPATH": str(code)},
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    [saved] = set((work / "results").glob("*.json")) - before
    [row] = [r for r in json.loads(saved.read_text()) if r.get("target") == "external:relay"]
    return {"msg_s": row["e2e_mps"], "cpu_ms": 1000 * row["relay_cpu_s"] / n, "load": row["cpu_busy_pct"]}


def add_round_options(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    """The options of a script that runs harness rounds of relay (this one, ``cpu_split.py``)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("-n", type=int, default=None, help="messages per round (2k: 2000, 1mb: 200)")
    parser.add_argument("--size", choices=("2k", "1mb"), default="2k")
    parser.add_argument("--harness", type=Path, default=ROOT.parent / "shared" / "bench")
    parser.add_argument("--work", type=Path, default=ROOT.parent / "bench")


def messages(args: argparse.Namespace) -> int:
    return int(args.n or (200 if args.size == "1mb" else 2000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the commit to compare with (e.g. HEAD~3, a tag)")
    add_round_options(parser, rounds=3)
    args = parser.parse_args()
    n, (work, env) = messages(args), harness_env(args.harness, args.work)
    with tempfile.TemporaryDirectory(prefix="relay-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(base), args.base],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            figures: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
            for number in range(1, args.rounds + 1):
                for name, code in (("base", base), ("this", ROOT)):
                    got = one_round(work, env, code, args.size, n)
                    figures[name].append(got)
                    print(f"round {number} {name:4} {got['msg_s']:7.1f} msg/s  relay {got['cpu_ms']:6.2f} ms CPU/msg"
                          f"  machine {got['load']:.0f}%", flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
            subprocess.run([str(work / ".venv" / "bin" / "python"), "bench.py", "down"], cwd=work, env=env,
                           check=False, stdout=subprocess.DEVNULL)  # fmt: skip
    for name in ("base", "this"):
        rows = figures[name]
        print(f"median {name:4} {statistics.median(r['msg_s'] for r in rows):7.1f} msg/s  relay "
              f"{statistics.median(r['cpu_ms'] for r in rows):6.2f} ms CPU/msg")  # fmt: skip
    ratio = statistics.median(t["msg_s"] / b["msg_s"] for b, t in zip(figures["base"], figures["this"], strict=True))
    print(f"this/base, median of the rounds' ratios: {ratio:.3f}x msg/s")


if __name__ == "__main__":
    sys.exit(main())
