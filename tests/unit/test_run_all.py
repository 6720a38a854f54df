"""bench/run_all.py and bench/reporting.py: running benchmarks, parsing their output, writing the report."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _program(name: str) -> ModuleType:
    """A bench script imported the way the scripts see each other when run: from bench/ itself."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        return importlib.import_module(name)


reporting = _program("reporting")
run_all = _program("run_all")


def _script(path: Path, body: str) -> Path:
    path.write_text(f"import sys, time, json\n{body}\nif __name__ == \"__main__\":\n    main()\n")
    return path


def test_key_values_take_the_figures_and_later_lines_win() -> None:
    out = "table\nPUSH_RATIO=0.74 (goal >= 0.8)\nAB=1 B_2=x.y\nnot_a_key=3\nAB=2\n"
    assert run_all.key_values(out) == {"PUSH_RATIO": "0.74", "AB": "2", "B_2": "x.y"}


def test_options_are_read_from_add_argument_calls_only(tmp_path: Path) -> None:
    declared = _script(tmp_path / "a.py", 'def main():\n    ap.add_argument("--json", metavar="FILE")')
    mentioned = _script(tmp_path / "b.py", 'def main():\n    run(["edgectl", "--json"])')
    assert run_all.has_option(declared, "--json")
    assert not run_all.has_option(mentioned, "--json")
    assert not run_all.has_option(declared, "--quick")


def test_a_benchmark_runs_with_its_json_and_its_figures(tmp_path: Path) -> None:
    script = _script(tmp_path / "fake.py", (
        "def main():\n"
        "    import argparse\n"
        "    ap = argparse.ArgumentParser()\n"
        '    ap.add_argument("--json")\n'
        '    ap.add_argument("--quick", action="store_true")\n'
        "    a = ap.parse_args()\n"
        '    json.dump({"quick": a.quick}, open(a.json, "w"))\n'
        '    print("X_RATIO=1.5")'))
    result = run_all.run_one("fake", script, 30, quick=True)
    assert result["status"] == "ok" and result["returncode"] == 0
    assert result["figures"] == {"X_RATIO": "1.5"}
    assert result["data"] == {"quick": True}
    assert result["flags"] == ["--quick"]


def test_a_failing_benchmark_keeps_its_error_output(tmp_path: Path) -> None:
    script = _script(tmp_path / "bad.py", 'def main():\n    print("partial")\n    raise SystemExit("broke here")')
    result = run_all.run_one("bad", script, 30, quick=False)
    assert result["status"] == "failed (exit 1)"
    assert "partial" in result["stdout"] and "broke here" in result["stderr_tail"]


def test_a_benchmark_over_its_time_limit_is_stopped_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = _script(tmp_path / "slow.py", (
        "def main():\n"
        "    import subprocess\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    print('started', flush=True)\n"
        "    time.sleep(600)"))
    started = time.monotonic()
    result = run_all.run_one("slow", script, 2, quick=False)
    assert result["status"] == "timed out after 2 s"
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        if "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break  # a zombie: killed, waiting for its (dead) parent's reaper
        time.sleep(0.05)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"


def test_unknown_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_all.main(["--only", "no_such_bench", "--report-only"]) == 2
    assert "unknown benchmark no_such_bench" in capsys.readouterr().err


PUSH_OUT = """chunk 64 KiB: 306 chunks, 18.5 MB on the wire (306 compressed); split+compress 1.59 s
  baseline     0.101 s    182.9 MB/s
  push         0.136 s    136.2 MB/s
  republish    0.087 s    212.1 MB/s
  probe        0.116 s    159.6 MB/s
  raw receive  0.078 s    238.0 MB/s
PUSH_RATIO=0.74 (goal >= 0.8)
"""


def _result(name: str, stdout: str = "", status: str = "ok", data: object = None) -> dict[str, object]:
    return {"name": name, "status": status, "started": "2026-01-02T03:04:05+00:00", "seconds": 1.0,
            "stdout": stdout, "figures": run_all.key_values(stdout), "data": data, "flags": []}


def test_the_report_puts_figures_beside_their_baselines_and_names_missing_benchmarks(tmp_path: Path) -> None:
    rows = [{"configuration": "int8", "mode": "int8", "sparsity": 0.0, "bytes": 1000, "wire_bytes": 500,
             "ratio": 4.0, "accuracy": 0.98, "accuracy_drop_pt": 0.1, "p50_ms": 0.03, "encoding": "dense"},
            {"configuration": "prune 90 % + int8", "mode": "int8", "sparsity": 0.9, "bytes": 1000,
             "wire_bytes": 100, "ratio": 20.0, "accuracy": 0.97, "accuracy_drop_pt": 0.6, "p50_ms": 0.03,
             "encoding": "dense"}]
    convert = {"float32_tflite_bytes": 2000, "float_accuracy": 0.981, "train": 10, "test": 5, "seed": 0,
               "max_drop_pt": 0.5, "goal": 12, "best_wire_ratio": 4.0, "rows": rows}
    results = {
        "convert_digits": _result("convert_digits", "BEST_WIRE_RATIO_AT_0.5PT=4.00\n", data=convert),
        "push": _result("push", PUSH_OUT),
        "delivery": {"name": "delivery", "status": "not run: missing", "stdout": "", "figures": {}, "data": None},
    }
    host = run_all.machine()
    text = reporting.render(results, ["convert_digits", "push", "delivery"],
                            {"convert_digits": "converter", "push": "delivery", "delivery": "delivery"}, host, tmp_path)
    assert "| prune 90 % + int8 | 1,000 | 100 | 20.00× | 97.00 % | +0.60 |" in text
    assert "2,000 bytes" in text  # the float32 baseline of the same run
    assert "| 64 KiB (306 chunks, 18.5 MB) | 182.9 | 136.2 | 0.74 | 212.1 | 238.0 | 159.6 | 0.67 |" in text
    assert "| `BEST_WIRE_RATIO_AT_0.5PT` | 4.00 |" in text and "| >= 12 | **no** |" in text
    assert "`bench/delivery.py`: not run: missing" in text
    assert host["cpu"] in text and f"numpy {host['versions']['numpy']}" in text
    assert "2026-01-02 03:04 UTC" in text


def test_the_latency_data_is_reduced_to_quantiles_and_plotted(tmp_path: Path) -> None:
    samples = {"small": {"bare": [10.0, 11.0, 12.0, 50.0], "predict_raw": [14.0, 15.0, 16.0, 60.0]}}
    data = {"samples_us": samples, "thread_cpu_us": {"bare": [1.0, 2.0]}, "backend": "litert"}
    stored = reporting.prepare_data("agent_overhead", data, tmp_path)
    assert "samples_us" not in stored and "thread_cpu_us" not in stored
    assert stored["quantiles_us"]["small"]["bare"]["n"] == 4
    assert stored["quantiles_us"]["small"]["predict_raw"]["p50"] == pytest.approx(15.5)
    png = tmp_path / reporting.LATENCY_PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(stored)  # what is stored must be JSON


def test_discovery_finds_programs_not_helpers() -> None:
    found = run_all.discover()
    assert "convert_digits" in found and "agent_overhead" in found
    assert "reporting" not in found and "run_all" not in found
    assert sys.executable  # the benchmarks run with this interpreter


CLUSTER_OUT = """\
200 agents (25 per worker process), probation 1 s, telemetry every 1 s; 2 cores, load average 0.7 before the run
one Mosquitto, then three NATS 2.15.1 nodes on loopback (MQTT stream replicas 3, MQTT 3.1.1); ...
  one Mosquitto (baseline): online after 1.7 s; first committed 3.21 s, median 5.84 s, all committed 7.15 s
  cluster: online after 13.5 s; first committed 6.74 s, median 7.78 s, all committed 8.63 s (x1.21 one Mosquitto)
  cluster, node 2 killed: online after 13.5 s; only 150 committed within 600 s, 0 failed
  node 2 killed 8.25 s after the group document, once 50 agents had committed; 47 of its 67 agents had not committed yet
CLUSTER_AGENTS=200 CLUSTER_ALL_COMMITTED_S=8.63 NODE_KILL_ALL_COMMITTED_S=none MOSQUITTO_ALL_COMMITTED_S=7.15
"""


def test_the_cluster_section_sets_each_rollout_beside_one_mosquitto() -> None:
    r = {"name": "fleet_cluster", "status": "ok", "stdout": CLUSTER_OUT,
         "figures": run_all.key_values(CLUSTER_OUT)}
    text = "\n".join(reporting.section_cluster(r))
    assert "| 8.63 s (first 6.74, median 7.78) | one Mosquitto: 7.15 s | 1.21× | ≤ 60 s for 200 agents |" in text
    assert "only 150 of 200 within 600 s" in text
    assert "47 of its 67 agents had not committed yet" in text
    heads = {row[0]: row for row in reporting.headline_rows(r)}
    assert heads["`CLUSTER_ALL_COMMITTED_S`"][-2:] == ("<= 60", "yes")
    assert heads["`NODE_KILL_ALL_COMMITTED_S`"][-2:] == ("<= 90", "**no**")


def test_the_delivery_section_shows_nats_beside_its_own_baseline() -> None:
    data = {"artifact_bytes": 20_600_000, "wire_bytes": 20_600_000, "raw_pub_sub_s": 0.5,
            "raw_retained_fetch_s": 0.4, "agent_download_s": 0.8, "push_publish_s": 0.6, "push_compress_s": 0.1,
            "ratios": [0.6, 0.62, 0.64], "nats": {"raw_pub_sub_s": 2.0, "raw_retained_fetch_s": 0.1,
                                                   "agent_download_s": 1.0, "ratios": [1.9, 2.0, 2.1]}}
    text = "\n".join(reporting.section_delivery({"name": "delivery", "data": data, "stdout": ""}))
    assert "| one NATS node: (b) agent, document → verified artifact on disk | 1.000 | 20.6 | 2.00 |" in text
    assert "Mosquitto 0.60, 0.62, 0.64; NATS 1.90, 2.00, 2.10." in text
    heads = {row[0]: row for row in reporting.headline_rows({"figures": {"DELIVERY_RATIO": "0.55",
                                                                         "NATS_DELIVERY_RATIO": "0.55"}})}
    assert heads["`DELIVERY_RATIO`"][-1] == "**no**"  # the goal is a median of 0.6
    assert heads["`NATS_DELIVERY_RATIO`"][-1] == "yes"
