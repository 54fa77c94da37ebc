"""relay beside Postfix on this machine, in one run: the shared harness driven for this checkout.

    .venv/bin/python bench/side_by_side.py [--harness ../shared/bench] [--work ../bench]
        [--phases relay,relay1mb,kill9,memory] [--reps 3] [-n 2000] [--n1mb 200]

Postfix's ``smtp-source`` sends the same load, 10 sessions at a time, to relay and to a Postfix
smarthost (default, and with TLS connection reuse), both forwarding over STARTTLS + AUTH to an
upstream Postfix with Dovecot SASL, in interleaved rounds: the ratios are taken in one run on the same
machine (absolute figures move by a third between runs on a shared machine; ratios much less).
``relay`` is this checkout's, from its ``.venv`` (``make install``). Phases: ``relay`` (2 KB messages),
``relay1mb`` (1 MiB), ``kill9`` (SIGKILL every 3 s under 100 msg/s: LOST must be 0), ``memory``
(peak RSS relaying one message of 0, 1, 5 and 25 MB, summed over relay's processes).

The harness writes its configs, state and results where it runs, so it runs from a copy (``--work``,
made from ``--harness`` on first use, with its ``setup.sh``: Debian's postfix, dovecot-core and
openssl, hence root). Everything listens on 127.0.0.1; nothing in /etc is changed. Prints what the
harness prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def phase_args(phase: str, args: argparse.Namespace) -> list[str]:
    if phase == "relay":
        return ["relay", "--targets", "postfix,postfix-reuse,external:relay", "-n", str(args.n), "--concs", "10",
                "--reps", str(args.reps)]  # fmt: skip
    if phase == "relay1mb":
        return ["relay1mb", "--targets", "postfix,external:relay", "--n1mb", str(args.n1mb), "--reps", str(args.reps)]
    if phase == "kill9":
        return ["kill9", "--targets", "external:relay", "-n", "6000", "--rate", "100", "--kill-every", "3"]
    if phase == "memory":
        return ["memory", "--targets", "external:relay", "--mem-sizes", "0,1,5,25", "--reps", str(args.reps)]
    raise SystemExit(f"unknown phase {phase!r}: relay, relay1mb, kill9 or memory")


def prepare(harness: Path, work: Path) -> None:
    if not (work / "bench.py").exists():
        if not (harness / "bench.py").exists():
            raise SystemExit(f"no harness at {harness} (give --harness)")
        shutil.copytree(harness, work, ignore=shutil.ignore_patterns(".venv", "run", "results", "conf"))
    if not (work / ".venv").exists():
        subprocess.run(["./setup.sh"], cwd=work, check=True)


def harness_env(harness: Path, work: Path) -> tuple[Path, dict[str, str]]:
    """The harness's working copy (made and set up if needed) and an environment with this checkout's
    ``relay`` first on PATH, as the harness's ``external:relay`` target runs it."""
    venv_bin = ROOT / ".venv" / "bin"
    if not (venv_bin / "relay").exists():
        raise SystemExit(f"no {venv_bin / 'relay'}: run `make install` first")
    work = work.resolve()
    prepare(harness.resolve(), work)
    return work, {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", type=Path, default=ROOT.parent / "shared" / "bench")
    parser.add_argument("--work", type=Path, default=ROOT.parent / "bench")
    parser.add_argument("--phases", default="relay,relay1mb,kill9,memory")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--n1mb", type=int, default=200)
    args = parser.parse_args()
    work, env = harness_env(args.harness, args.work)
    python = str(work / ".venv" / "bin" / "python")
    try:
        for phase in args.phases.split(","):
            print(f"==> {phase}", flush=True)
            subprocess.run([python, "bench.py", *phase_args(phase.strip(), args)], cwd=work, env=env, check=True)
    finally:
        subprocess.run([python, "bench.py", "down"], cwd=work, env=env, check=False)


if __name__ == "__main__":
    sys.exit(main())
