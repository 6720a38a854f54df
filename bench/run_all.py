"""Run every benchmark in bench/ and regenerate BENCHMARKS.md (and the plots under docs/img/).

Every Python file in bench/ with a ``__main__`` block is a benchmark; each runs in its own process
with a time limit, its output is captured, and the result (status, output, the ``KEY=value`` figures
of its last lines, and the JSON it writes when it has a ``--json FILE`` option) is stored in
``bench/results/NAME.json`` with the machine and the date. BENCHMARKS.md is then written from every
stored result, so ``--only convert_digits`` refreshes that section and keeps the others as they were
(each section says when and where it was measured). A benchmark that is expected but absent is
reported as "not run: missing"; a failure or a timeout is reported with its output, never fatal.

Run: ``.venv/bin/python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]``
(``make bench``). The full run takes 15 minutes or more on two cores.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import reporting  # bench/reporting.py: a program's own folder is the first place Python looks

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"

PACKAGES = ("tensorflow", "ai-edge-litert", "tflite-runtime", "numpy", "paho-mqtt", "cryptography", "psutil")
KEY_VALUE = re.compile(r"(?<![\w.])([A-Z][A-Z0-9_.]*[A-Z0-9])=(\S+)")
STDERR_TAIL = 60


@dataclass(frozen=True)
class Expected:
    """A benchmark the report has a section for, with its time limit."""

    name: str
    area: str
    timeout_s: float


# The report's areas, in order, and the benchmarks that feed them (others found in bench/ go to "other").
EXPECTED = (
    Expected("convert_digits", "converter", 1200),
    Expected("convert_structured", "converter", 1200),
    Expected("convert_gate", "converter", 1800),
    Expected("agent_overhead", "overhead", 1800),
    Expected("shadow", "overhead", 900),
    Expected("push", "delivery", 1200),
    Expected("delivery", "delivery", 1800),
    Expected("fleet_scale", "fleet", 2400),
    Expected("fleet_cluster", "fleet", 2400),
    Expected("history", "fleet", 1200),
    Expected("drift", "fleet", 1200),
    Expected("reliability", "reliability", 2400),
)
DEFAULT_TIMEOUT_S = 1800.0


def discover() -> dict[str, Path]:
    """Benchmark scripts in bench/: Python files that run as programs (helpers have no __main__ block)."""
    found = {}
    for path in sorted(BENCH.glob("*.py")):
        if path.stem in ("run_all", "reporting", "__init__"):
            continue
        if re.search(r'^if __name__ == "__main__":', path.read_text(encoding="utf-8"), re.M):
            found[path.stem] = path
    return found


def has_option(path: Path, option: str) -> bool:
    """Whether a script declares an argparse option (read from its source: running it to ask could start it)."""
    return re.search(r"add_argument\(\s*" + re.escape(f'"{option}"'), path.read_text(encoding="utf-8")) is not None


def machine() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and the versions of the packages and broker the figures depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        ram = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, AttributeError):
        pass
    os_name = platform.system()
    try:
        os_name = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["mosquitto"] = _mosquitto_version()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": ram, "os": f"{os_name}, kernel {platform.release()}",
            "arch": platform.machine(), "python": platform.python_version(), "versions": versions}


def _mosquitto_version() -> str | None:
    for exe in ("mosquitto", "/usr/sbin/mosquitto"):
        try:
            out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r"mosquitto version (\S+)", out)
        if match:
            return match.group(1)
    return None


def key_values(stdout: str) -> dict[str, str]:
    """The ``KEY=value`` figures a benchmark prints (later lines win)."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        for key, value in KEY_VALUE.findall(line):
            found[key] = value
    return found


def run_one(name: str, path: Path, timeout_s: float, quick: bool) -> dict[str, Any]:
    """Run one benchmark in its own process group; its output is echoed with a prefix as it comes."""
    flags = ["--quick"] if quick and has_option(path, "--quick") else []
    json_file = None
    if has_option(path, "--json"):
        fd, json_file = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
        os.close(fd)
        flags += ["--json", json_file]
    started = time.time()
    load_before = os.getloadavg()[0]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    shown_flags = ["--quick"] if "--quick" in flags else []
    print(f"== {name}: {' '.join(['bench/' + path.name, *shown_flags])} (time limit {timeout_s:g} s)", flush=True)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, str(path), *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=_echo, args=(proc, name, lines), daemon=True)
        reader.start()
        status = "ok"
        try:
            code = proc.wait(timeout_s)
            if code != 0:
                status = f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:g} s"
            _kill_group(proc)
            code = proc.wait()
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        reader.join(10)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    stdout = "".join(lines)
    data = None
    if json_file is not None:
        try:
            text = Path(json_file).read_text(encoding="utf-8")
            data = json.loads(text) if text.strip() else None
        except (OSError, json.JSONDecodeError) as exc:
            print(f"   {name}: no readable --json output ({exc})", flush=True)
        finally:
            Path(json_file).unlink(missing_ok=True)
    seconds = time.time() - started
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {
        "name": name, "status": status, "returncode": code, "flags": shown_flags,
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1), "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "stdout": stdout, "stderr_tail": "\n".join(stderr.splitlines()[-STDERR_TAIL:]) if status != "ok" else "",
        "figures": key_values(stdout), "data": data,
    }


def _echo(proc: subprocess.Popen[str], name: str, lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        print(f"   {name}: {line}", end="", flush=True)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Stop the benchmark and everything it started (brokers, agents): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def load_results() -> dict[str, dict[str, Any]]:
    """Every stored result, by benchmark name."""
    out = {}
    for path in sorted(RESULTS.glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"ignoring {path}: {exc}", file=sys.stderr)
            continue
        out[result.get("name", path.stem)] = result
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, store their results, and write BENCHMARKS.md and the plots."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Benchmarks: " + ", ".join(
        sorted({e.name for e in EXPECTED} | set(discover()))))
    ap.add_argument("--only", action="append", metavar="NAME", default=[], help="run only this benchmark (repeatable)")
    ap.add_argument("--skip", action="append", metavar="NAME", default=[], help="do not run this benchmark (repeatable)")
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    ap.add_argument("--report-only", action="store_true", help="run nothing; rewrite BENCHMARKS.md from stored results")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="report file (BENCHMARKS.md)")
    args = ap.parse_args(argv)

    scripts = discover()
    known = {e.name for e in EXPECTED} | set(scripts)
    for option, names in (("--only", args.only), ("--skip", args.skip)):
        unknown = sorted(set(names) - known)
        if unknown:
            print(f"run_all: error: {option}: unknown benchmark {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                  file=sys.stderr)
            return 2
    timeouts = {e.name: e.timeout_s for e in EXPECTED}
    order = [e.name for e in EXPECTED] + sorted(set(scripts) - set(timeouts))
    selected = [n for n in order if (not args.only or n in args.only) and n not in args.skip]
    if args.report_only:
        selected = []

    RESULTS.mkdir(parents=True, exist_ok=True)
    host = machine()
    for name in selected:
        if name not in scripts:
            result: dict[str, Any] = {"name": name, "status": "not run: missing", "started": _now(), "stdout": "",
                                      "figures": {}, "data": None}
            print(f"== {name}: not run: bench/{name}.py is missing", flush=True)
        else:
            result = run_one(name, scripts[name], timeouts.get(name, DEFAULT_TIMEOUT_S), args.quick)
        result["machine"] = host
        result["data"] = reporting.prepare_data(name, result.get("data"), ROOT)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    results = load_results()
    for name in order:
        results.setdefault(name, {"name": name, "status": "not run", "stdout": "", "figures": {}, "data": None})
    areas = {e.name: e.area for e in EXPECTED}
    reporting.redraw(results, ROOT)
    text = reporting.render(results, order, areas, host, ROOT)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
