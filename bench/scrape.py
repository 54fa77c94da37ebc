"""What one /metrics scrape costs with a big queue: the spool is counted at every scrape.

    .venv/bin/python bench/scrape.py [--entries 10000] [--scrapes 20]

Fills a throwaway spool with ``--entries`` deferred entries (as many messages as a week-long outage
of a busy ERP could leave), then times ``--scrapes`` scrapes over HTTP from relay's own exporter.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.config.models import MetricsConfig
from relay.envelope import Outgoing
from relay.queue.metrics import Metrics
from relay.queue.spool import Spool


def fill(spool: Spool, entries: int) -> None:
    spool.setup()
    batch = [Outgoing("bench", "a@relay.test", ("c@example.com",), b"Subject: x\r\n\r\ny\r\n")] * 500
    for _ in range(0, entries, len(batch)):
        for entry in spool.commit(batch):
            spool.move(entry.id, source="incoming", target="deferred")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10000)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    spool = Spool(Path(tempfile.mkdtemp(prefix="relay-scrape-")), fsync=False)
    fill(spool, args.entries)
    metrics = Metrics(spool)
    address = metrics.serve(MetricsConfig(port=0))
    assert address is not None
    url = f"http://127.0.0.1:{address[1]}/metrics"
    timings = []
    for _ in range(args.scrapes):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        timings.append(time.perf_counter() - started)
    metrics.close()
    timings.sort()
    print(f"{spool.count('deferred')} deferred entries: scrape median {timings[len(timings) // 2] * 1000:.1f} ms, "
          f"max {timings[-1] * 1000:.1f} ms over {args.scrapes} scrapes")


if __name__ == "__main__":
    main()
