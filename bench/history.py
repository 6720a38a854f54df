"""Issue 18's history benchmark: how fast `edgectl fleet collect --db` stores telemetry in SQLite and PostgreSQL.

A load generator (fleet_scale.py's: one process publishing real telemetry documents of 200 devices at QoS 0
as fast as paho takes them) feeds one Mosquitto. Each round runs, one after the other under the same load:
a bare paho subscriber that only counts the stream (the baseline, fleet_scale.py's too), then the real
collector process writing to a SQLite file, the baseline again, then the collector writing to PostgreSQL
(a schema of its own, dropped at the end). A collector's rate is the messages it received over the time
from the first message to the end of its last database write, and every message must be in the
database as a row afterwards (the bench fails otherwise). Best of the rounds for each.

Prints every figure, then ``HISTORY_INGEST_SQLITE=<r> HISTORY_SQLITE_BASELINE=<b> HISTORY_SQLITE_RATIO=<r/b>
HISTORY_INGEST_PG=<r> HISTORY_PG_BASELINE=<b> HISTORY_PG_RATIO=<r/b>`` last.
Goals: >= 5,000 telemetry messages/s into SQLite, >= 10,000 into PostgreSQL.

PostgreSQL: EDGEFLEET_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/test); without a server the
PostgreSQL figures are `none`.

Run: .venv/bin/python bench/history.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLEET_SCALE = ROOT / "bench" / "fleet_scale.py"
GOALS = {"sqlite": 5000.0, "pg": 10000.0}
PG_SERVER = os.environ.get("EDGEFLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
DEVICES = 200


def payloads(path: Path) -> int:
    """Write 200 devices' telemetry documents (hex, one a line) as an agent sends them; return one's size."""
    sys.path.insert(0, str(ROOT))
    from edgefleet.protocol import Telemetry, canonical_json

    docs = []
    for i in range(DEVICES):
        doc = {"ts": time.time(), "device_id": f"gen-{i}", "agent_version": "0.1.0", "uptime_s": 3600.0,
               "cpu_percent": 2.5, "rss_bytes": 73_000_000, "system_cpu_percent": 11.0,
               "mem_available_bytes": 1_500_000_000, "load1": 0.4, "disk_free_bytes": 20_000_000_000,
               "models": [{"name": "det", "version": 3, "phase": "COMMITTED", "count": 1200 + i, "errors": 1,
                           "p50_ms": 4.2, "p95_ms": 7.9, "p99_ms": 9.1, "max_ms": 12.0}]}
        docs.append(canonical_json(Telemetry.from_dict(doc).to_dict()).hex())
    path.write_text("\n".join(docs))
    return len(bytes.fromhex(docs[0]))


def baseline(port: int, count: int, payload_file: Path) -> dict[str, Any]:
    """The bare subscriber's rate under the generator's load."""
    sub = subprocess.Popen([sys.executable, str(FLEET_SCALE), "--raw-subscriber", str(port), str(count)], cwd=ROOT,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sub.stderr is not None
    sub.stderr.readline()
    generate(port, count, payload_file)
    out, err = sub.communicate(timeout=300)
    if sub.returncode != 0:
        raise RuntimeError(f"baseline subscriber failed: {err}")
    return json.loads(out)  # type: ignore[no-any-return]


def generate(port: int, count: int, payload_file: Path) -> None:
    gen = subprocess.Popen([sys.executable, str(FLEET_SCALE), "--generate", str(port), str(count), str(DEVICES),
                            str(payload_file)], cwd=ROOT)
    gen.wait(300)


def collector(url: str, port: int, count: int, payload_file: Path, db: str) -> dict[str, Any]:
    """The real collector writing to `db` under the generator's load; its summary with the ingest rate."""
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "fleet", "collect", "--db", db,
                             "--only", "telemetry", "--count", str(count), "--duration", "300", "--json",
                             "--report-every", "3600", "--keep-days", "0", "--downsample-after", "0",
                             "--broker", url], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if not line.startswith("collecting"):
        raise RuntimeError(f"collector did not start: {line}{proc.stderr.read()}")
    generate(port, count, payload_file)
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"collector failed ({proc.returncode}): {err}")
    summary: dict[str, Any] = json.loads(out)
    history = summary["history"]
    span = (history["written_at"] or 0.0) - (summary["first_received"] or 0.0)
    summary["ingest_msgs_per_s"] = (summary["messages"] - 1) / span if summary["messages"] > 1 and span > 0 else 0.0
    summary["rows_in_db"] = count_rows(db)
    return summary


def count_rows(db: str) -> int:
    from edgefleet.converter.fleet.history.store import HistoryStore

    with HistoryStore.open(db) as store:
        return int(store.fetch("SELECT count(*) FROM telemetry")[0][0])


def pg_target() -> tuple[str | None, str | None]:
    """(a URL with a fresh schema, the schema) or (None, why not)."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed"
    try:
        psycopg.connect(PG_SERVER, connect_timeout=3).close()
    except psycopg.Error as err:
        return None, f"no PostgreSQL at {PG_SERVER} ({str(err).strip().splitlines()[0] if str(err).strip() else err})"
    schema = f"edgefleet_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    return f"{PG_SERVER}?schema={schema}", schema


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def describe(label: str, runs: list[dict[str, Any]], base: list[dict[str, Any]], goal: float) -> tuple[float, float]:
    best = max(r["ingest_msgs_per_s"] for r in runs)
    best_base = max(b["msgs_per_s"] for b in base)
    base_rounds = ", ".join(f"{b['msgs_per_s']:.0f}" for b in base)
    our_rounds = ", ".join(f"{r['ingest_msgs_per_s']:.0f}" for r in runs)
    print(f"  bare paho subscriber counting (baseline): {best_base:.0f} msg/s (rounds: {base_rounds})")
    print(f"  edgectl fleet collect --db {label}: {best:.0f} msg/s first message to last write "
          f"(rounds: {our_rounds}; receive rate {max(r['msgs_per_s'] for r in runs):.0f}), "
          f"x{best / best_base:.2f} the baseline (goal >= {goal:g} msg/s)")
    return best, best_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 messages a run, 2 rounds")
    args = parser.parse_args()
    count = 20_000 if args.quick else 100_000
    rounds = 2 if args.quick else 3
    sys.path.insert(0, str(ROOT / "bench"))
    from fleet_scale import fleet_mosquitto

    pg, schema_or_why = pg_target()
    with tempfile.TemporaryDirectory(prefix="history-") as tmp:
        work = Path(tmp)
        size = payloads(work / "payloads.hex")
        broker = fleet_mosquitto(work / "broker")
        results: dict[str, list[dict[str, Any]]] = {"sqlite": [], "pg": [], "base_sqlite": [], "base_pg": []}
        try:
            print(f"{count} telemetry documents of {size} bytes from {DEVICES} devices a run, QoS 0, one generator "
                  f"process; broker, generator and collector share {os.cpu_count()} cores; load average "
                  f"{os.getloadavg()[0]:.1f} before the run")
            for k in range(rounds):
                results["base_sqlite"].append(baseline(broker.port, count, work / "payloads.hex"))
                results["sqlite"].append(collector(broker.url, broker.port, count, work / "payloads.hex",
                                                   str(work / f"history-{k}.sqlite")))
                if pg is not None:
                    results["base_pg"].append(baseline(broker.port, count, work / "payloads.hex"))
                    results["pg"].append(collector(broker.url, broker.port, count, work / "payloads.hex", pg))
        finally:
            broker.kill()
            if pg is not None and schema_or_why is not None:
                drop_schema(schema_or_why)
    for label, runs in (("sqlite", results["sqlite"]), ("pg", results["pg"])):
        for r in runs:
            if r["history"]["failed_rows"]:
                raise SystemExit(f"{label}: {r['history']['failed_rows']} rows failed to be written")
    for r in results["sqlite"]:  # a file per round
        if r["rows_in_db"] != r["messages"]:
            raise SystemExit(f"sqlite: {r['messages']} received but {r['rows_in_db']} rows stored")
    if results["pg"]:  # one schema for every round: the rows add up
        stored = results["pg"][-1]["rows_in_db"]
        received = sum(r["messages"] for r in results["pg"])
        if stored != received:
            raise SystemExit(f"pg: {received} received over the rounds but {stored} rows stored")
    print("SQLite (WAL, one transaction per batch):")
    sq, sq_base = describe("FILE.sqlite", results["sqlite"], results["base_sqlite"], GOALS["sqlite"])
    line = f"HISTORY_INGEST_SQLITE={sq:.0f} HISTORY_SQLITE_BASELINE={sq_base:.0f} HISTORY_SQLITE_RATIO={sq / sq_base:.2f}"
    if results["pg"]:
        print("PostgreSQL (COPY per batch into day partitions):")
        pq, pq_base = describe("postgresql://...", results["pg"], results["base_pg"], GOALS["pg"])
        line += f" HISTORY_INGEST_PG={pq:.0f} HISTORY_PG_BASELINE={pq_base:.0f} HISTORY_PG_RATIO={pq / pq_base:.2f}"
    else:
        print(f"PostgreSQL: not measured: {schema_or_why}")
        line += " HISTORY_INGEST_PG=none"
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine makes every figure worse)")
    print(line)


if __name__ == "__main__":
    main()
