"""BENCHMARKS.md and its plots, from the results bench/run_all.py stores (one JSON document per benchmark).

Each benchmark gets the tables its output allows: the figures of its JSON output where it writes one
(convert_digits, agent_overhead), otherwise what its printed lines say, and always its ``KEY=value``
figures and its whole output. Text that does not parse is shown as printed, never guessed at.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

IMG = Path("docs") / "img"
CONVERT_PLOT = IMG / "bench-convert-size-accuracy.png"
LATENCY_PLOT = IMG / "bench-latency.png"

AREAS = (
    ("converter", "Converter: sizes and accuracy"),
    ("overhead", "Agent overhead"),
    ("delivery", "Delivery: throughput and delta fraction"),
    ("rollback", "Rollback time"),
    ("fleet", "Fleet scale"),
    ("reliability", "Reliability"),
    ("other", "Other benchmarks"),
)

# Headline figures (the last line of each benchmark) with the goal its issue set: (text, op, goal).
GOALS: dict[str, tuple[str, str, float | None]] = {
    "BEST_WIRE_RATIO_AT_0.5PT": ("float32 TFLite bytes / bytes on the wire, best at <= 0.5 pt held-out accuracy drop",
                                 ">=", 12),
    "STRUCTURED_SPEEDUP": ("bare p50 of the int8 CNN / bare p50 of its structured-pruned (--prune-channels) int8 "
                           "version at <= 1 pt held-out accuracy drop", ">=", 1.5),
    "DENSE_INT8_P50_MS": ("bare p50 ms of the unpruned int8 CNN the speedup is measured on", ">=", 1.0),
    "GATE_FALSE_REJECTS": ("digits conversions with < 0.5 pt held-out drop that the gate refused (seeds run until 20 are that good)", "<=", 0),
    "GATE_GOOD_CONVERSIONS": ("digits conversions with < 0.5 pt held-out drop (the bench stops at 20)", "", None),
    "GATE_REFUSED": ("digits conversions the gate refused, of every seed run", "", None),
    "AGENT_OVERHEAD_RATIO": ("in-process predict p50 / bare invoke p50, medium model", "<=", 1.05),
    "ADDED_US_SMALL": ("µs added to a bare invoke at p50, small model", "<=", 5),
    "SOCKET_NPY_ADDED_US": ("µs added by npy over the Unix socket at p50, small model", "<=", 200),
    "V2_BINARY_ADDED_US": ("µs a v2 binary-extension infer over the Unix socket adds to a bare invoke at p50, "
                           "small model", "<=", 200),
    "ROLLBACK_S": ("s from rollback trigger to the previous model answering (median)", "<=", 0.5),
    "SHADOW_OVERHEAD_RATIO": ("served p50 with a candidate shadowing 20 % of requests / served p50 without, "
                              "medium model, same run", "<=", 1.05),
    "SHADOW_DECISION_S": ("s from install to the shadow verdict at 50 req/s (200 samples at 20 %, median)", "<=", 30),
    "SHADOW_PLAIN_P50_US": ("served p50 µs of the medium model without shadow (the overhead's baseline)", "", None),
    "PUSH_RATIO": ("push throughput / raw paho publish throughput, 64 KiB chunks", ">=", 0.8),
    "DELIVERY_RATIO": ("agent download+verify+store throughput / raw paho publish->subscribe, one Mosquitto "
                       "(median of the rounds' ratios)", ">=", 0.6),
    "NATS_DELIVERY_RATIO": ("the same through one NATS node (MQTT 3.1.1; median of the rounds' ratios)", ">=", 0.5),
    "DELTA_FRACTION": ("bytes fetched for v2 / bytes of v2 (last-layer fine-tune)", "<=", 0.25),
    "FLEET_ALL_COMMITTED_S": ("s from group document to every agent committed", "<=", 60),
    "COLLECTOR_MSGS_PER_S": ("telemetry messages/s one collector ingests", ">=", 5000),
    "HISTORY_INGEST_SQLITE": ("telemetry messages/s `fleet collect --db` stores in SQLite (first message to last "
                              "write)", ">=", 5000),
    "HISTORY_INGEST_PG": ("telemetry messages/s `fleet collect --db` stores in PostgreSQL (COPY, day partitions)",
                          ">=", 10000),
    "HISTORY_SQLITE_BASELINE": ("msg/s a bare paho subscriber counts under the same load (SQLite's baseline)", "", None),
    "HISTORY_PG_BASELINE": ("msg/s a bare paho subscriber counts under the same load (PostgreSQL's baseline)", "", None),
    "HISTORY_SQLITE_RATIO": ("HISTORY_INGEST_SQLITE / its baseline", "", None),
    "HISTORY_PG_RATIO": ("HISTORY_INGEST_PG / its baseline", "", None),
    "DRIFT_DETECT_S": ("s from the first shifted request (x * 0.5 + 0.3) to the agent's DRIFT event, 50 req/s, "
                       "drift defaults", "<=", 60),
    "DRIFT_DETECT_THEORY_S": ("s the window needs in theory for that shift at 50 req/s x sample_rate (baseline)",
                              "", None),
    "DRIFT_FALSE_ALARMS": ("DRIFT events over DRIFT_FALSE_ALARM_S of in-distribution traffic on two agents", "<=", 0),
    "DRIFT_FALSE_ALARM_S": ("s of in-distribution traffic the false alarms were counted over (600 without --quick)",
                            "", None),
    "DRIFT_CONTROL_EVENTS": ("DRIFT events of the control agent (in distribution) while the other one was shifted",
                             "", None),
    "PROBE_OVER_REPUBLISH": ("time to learn which chunks the broker holds / time to republish them", "", None),
    "TRANSPORT_RECEIVE_RATIO": ("Transport receive speed / raw paho receive speed, 64 KiB chunks", "", None),
    "FLEET_AGENTS": ("agents in the fleet run", "", None),
    "CLUSTER_AGENTS": ("agents in each fleet of the cluster run", "", None),
    "CLUSTER_ALL_COMMITTED_S": ("s from group document to every agent committed, three-node NATS cluster", "<=", 60),
    "NODE_KILL_ALL_COMMITTED_S": ("the same with one node killed (SIGKILL) once a quarter of the fleet committed",
                                  "<=", 90),
    "MOSQUITTO_ALL_COMMITTED_S": ("the same fleet on one Mosquitto in the same run (the cluster's baseline)", "", None),
    "KILLS": ("agent kills in the fault profile", ">=", 100),
    "HOSTILE_MODELS": ("hostile models offered", ">=", 200),
    "CORRUPT_STATES": ("corrupt states after kills", "<=", 0),
    "LOST_MODELS": ("models lost after kills", "<=", 0),
    "FAILED_REQUESTS": ("failed requests in the soak", "<=", 0),
    "AGENT_CRASHES": ("agent crashes", "<=", 0),
    "SOAK_REQUESTS": ("requests in the soak (50/s over two updates and a rollback)", "", None),
    "FAULT_SCENARIOS": ("broker and disk fault scenarios passed / run", "", None),
    "TRUST_ATTACKS": ("attack scenarios of the trust suite (tests/test_trust_*.py) tried", "", None),
    "TRUST_BREACHES": ("attack scenarios not refused", "<=", 0),
}


# ---------------------------------------------------------------------- plots (when a benchmark ran)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prepare_data(name: str, data: Any, root: Path) -> Any:
    """Draw the plots a fresh result allows and return what to store (raw samples are not kept)."""
    if not isinstance(data, dict):
        return data
    if name == "convert_digits" and data.get("rows"):
        plot_convert(data, root / CONVERT_PLOT)
    if name == "agent_overhead" and "samples_us" in data:
        plot_latency(data["samples_us"], root / LATENCY_PLOT)
        data = dict(data)
        data["quantiles_us"] = {model: {method: _quantiles(ts) for method, ts in methods.items()}
                                for model, methods in data.pop("samples_us").items()}
        data["thread_cpu_quantiles_us"] = {m: _quantiles(ts) for m, ts in data.pop("thread_cpu_us", {}).items()}
    return data


def _quantiles(samples: Sequence[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(samples, dtype=float)
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def plot_convert(data: dict[str, Any], path: Path) -> None:
    """Accuracy against bytes on the wire, one colour per quantization mode, one marker per sparsity."""
    plt = _pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in data["rows"]))
    sparsities = sorted({r["sparsity"] for r in data["rows"]})
    markers = dict(zip(sparsities, "osD^v", strict=False))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    for i, mode in enumerate(modes):
        rows = sorted((r for r in data["rows"] if r["mode"] == mode), key=lambda r: r["sparsity"])
        ax.plot([r["wire_bytes"] for r in rows], [r["accuracy"] * 100 for r in rows], color=colours(i),
                linewidth=0.8, alpha=0.5)
        for r in rows:
            ax.scatter(r["wire_bytes"], r["accuracy"] * 100, color=colours(i), marker=markers[r["sparsity"]], s=36,
                       zorder=3)
    for i, mode in enumerate(modes):
        ax.scatter([], [], color=colours(i), marker="o", label=mode)
    for s in sparsities:
        ax.scatter([], [], color="grey", marker=markers[s], label=f"pruned {s:.0%}" if s else "not pruned")
    ax.axvline(data["float32_tflite_bytes"], color="black", linestyle=":", linewidth=1)
    ax.axhline(data["float_accuracy"] * 100, color="black", linestyle="--", linewidth=1)
    ax.axhline((data["float_accuracy"] * 100) - data.get("max_drop_pt", 0.5), color="red", linestyle=":", linewidth=1)
    ax.annotate("float32 TFLite", (data["float32_tflite_bytes"], 0.98), xycoords=("data", "axes fraction"),
                rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the wire (log scale)")
    ax.set_ylabel("accuracy on held-out digits (%)")
    ax.set_title(f"digits CNN: size vs accuracy per mode (dashed: float Keras, red: -{data.get('max_drop_pt', 0.5)} pt)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def redraw(results: dict[str, dict[str, Any]], root: Path) -> None:
    """Draw again the plots whose data is stored whole (the latency plot needs a fresh run's raw samples)."""
    r = results.get("convert_digits")
    if r and r.get("status") == "ok" and isinstance(r.get("data"), dict) and r["data"].get("rows"):
        plot_convert(r["data"], root / CONVERT_PLOT)


def plot_latency(samples: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Cumulative distribution of per-call latency for every method, one panel per model."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(6.5 * len(samples), 4.5), dpi=110, squeeze=False)
    for ax, (model, methods) in zip(axes[0], samples.items(), strict=True):
        for method, ts in methods.items():
            a = np.sort(np.asarray(ts, dtype=float))
            if a.size == 0:
                continue
            ax.plot(a, np.arange(1, a.size + 1) / a.size, label=f"{method} (n={a.size})",
                    linewidth=2.0 if method == "bare" else 1.2, color="black" if method == "bare" else None)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("µs per call (log scale)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(f"{model} model: latency per call", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- markdown helpers


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one character per column ('l' or 'r')."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _date(iso: str | None) -> str:
    if not iso:
        return "unknown date"
    return datetime.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def _met(value: float, op: str, goal: float) -> str:
    ok = value >= goal if op == ">=" else value <= goal
    return "yes" if ok else "**no**"


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.rstrip(",;"))
    except ValueError:
        return None


def machine_lines(m: dict[str, Any]) -> list[str]:
    """The machine as a two-column table."""
    v = m.get("versions", {})
    pkgs = ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
    missing = ", ".join(k for k, val in v.items() if val is None)
    rows = [("CPU", f"{m.get('cpu')} ({m.get('arch')})"), ("cores", m.get("cores")), ("RAM", m.get("ram")),
            ("OS", m.get("os")), ("Python", m.get("python")), ("packages", pkgs + (f"; not installed: {missing}"
                                                                                   if missing else ""))]
    return [table(("", ""), rows, "ll")]


def _machine_key(m: dict[str, Any] | None) -> str:
    import json

    return json.dumps(m or {}, sort_keys=True)


# ---------------------------------------------------------------------- per-benchmark sections


def section_convert(r: dict[str, Any]) -> list[str]:
    """The digits table: every mode and pruning level against the float32 TFLite conversion."""
    d = r.get("data")
    if not isinstance(d, dict) or not d.get("rows"):
        return []
    parts = (f"{d['train']} for training, {d['calibration']} for calibration, {d['evaluation']} for the gate"
             if "evaluation" in d else f"{d['train']} for training")
    out = [f"Baseline, same run: the float32 TFLite conversion of the same trained CNN, "
           f"{d['float32_tflite_bytes']:,} bytes; float Keras accuracy {d['float_accuracy'] * 100:.2f} % on "
           f"{d['test']} held-out digits ({parts}; disjoint, seed {d['seed']}). Accuracy and drop are on the "
           "held-out digits; the gate column is the converter's verdict on its evaluation part. Pruned rows are "
           "fine-tuned under the polynomial schedule; latency is one invoke on the host with LiteRT and XNNPACK.", ""]
    rows = []
    for row in d["rows"]:
        rows.append((row["configuration"], f"{row['bytes']:,}", f"{row['wire_bytes']:,}", f"{row['ratio']:.2f}×",
                     f"{row['accuracy'] * 100:.2f} %", f"{row['accuracy_drop_pt']:+.2f}",
                     f"{row['p50_ms']:.4f}", row["encoding"], row.get("gate") or "-"))
    out.append(table(("configuration", "bytes on disk", "bytes on the wire", "float32 / wire", "accuracy",
                      "drop (pt)", "p50 ms", "encoding", "gate"), rows, "lrrrrrrll"))
    out += ["", f"Best ratio at a drop of at most {d['max_drop_pt']} points: **{d['best_wire_ratio']:.2f}×** "
                f"(goal ≥ {d['goal']:g}).", "", f"![size vs accuracy per mode]({CONVERT_PLOT.as_posix()})"]
    return out


def section_structured(r: dict[str, Any]) -> list[str]:
    """Structured pruning: parameters, MACs, held-out accuracy and bare latency against the unpruned int8 CNN."""
    d = r.get("data")
    if not isinstance(d, dict) or not d.get("rows"):
        return []
    out = [f"Baseline, same run: the same CNN ({d['size']}x{d['size']} digits, widths {d['widths']}) without "
           f"structured pruning in int8, bare p50 {d['dense_int8_p50_ms']:.4f} ms (LiteRT, XNNPACK, one thread, "
           f"every model timed in turns). Float Keras accuracy {d['float_accuracy'] * 100:.2f} % on {d['test']} "
           f"held-out digits ({d['train']} training, {d['calibration']} calibration, {d['evaluation']} for the "
           "gate; disjoint).", ""]
    rows = [(row["configuration"], f"{row['params']:,}", f"{row['macs']:,}", f"{row['wire_bytes']:,}",
             f"{row['accuracy'] * 100:.2f} %", f"{row['accuracy_drop_pt']:+.2f}", f"{row['p50_ms']:.4f}",
             f"{row['speedup_vs_int8']:.2f}×", row.get("gate") or "-") for row in d["rows"]]
    out.append(table(("configuration", "parameters", "MACs", "bytes on the wire", "accuracy", "drop (pt)",
                      "bare p50 ms", "int8 p50 / p50", "gate"), rows, "lrrrrrrrl"))
    return out


MODEL_ORDER = ("small", "medium")
METHOD_ORDER = ("bare", "predict_raw", "predict", "socket: predict", "socket npy", "socket: bare", "socket v2 binary",
                "socket: predict+top_k", "socket json")


def _ordered(mapping: dict[str, Any], order: Sequence[str]) -> list[tuple[str, Any]]:
    """Items in the benchmark's own order (stored results have their keys sorted), unknown keys last."""
    rank = {k: i for i, k in enumerate(order)}
    return sorted(mapping.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def section_overhead(r: dict[str, Any]) -> list[str]:
    """Latency per method against the bare interpreter loop, and the idle footprint."""
    d = r.get("data")
    if not isinstance(d, dict) or "quantiles_us" not in d:
        return []
    out = [f"Backend {d['backend']}, {d['threads']} interpreter thread. Baseline, same run and interleaving: a bare "
           "`set_tensor` + `invoke` + `get_tensor` loop on the very interpreter the agent holds. `socket: ...` rows "
           "are in-process calls measured in the same interleaving as the socket calls.", ""]
    for model, methods in _ordered(d["quantiles_us"], MODEL_ORDER):
        bare = methods["bare"]
        rows = []
        for method, q in _ordered(methods, METHOD_ORDER):
            rows.append((method, _num(q["p50"]), _num(bare["p50"]), f"{q['p50'] / bare['p50']:.3f}", _num(q["p99"]),
                         _num(bare["p99"]), f"{q['p99'] / bare['p99']:.3f}", q["n"]))
        out += [f"**{model} model** (µs per call)", "",
                table(("method", "p50", "bare p50", "ratio", "p99", "bare p99", "ratio", "calls"), rows), ""]
    cpu = d.get("thread_cpu_quantiles_us") or {}
    if "bare" in cpu and "predict_raw" in cpu:
        out += [f"Thread CPU time per call, medium model (blind to time lost to other processes): predict_raw "
                f"{cpu['predict_raw']['p50']:.1f} µs vs bare {cpu['bare']['p50']:.1f} µs, ratio "
                f"{cpu['predict_raw']['p50'] / cpu['bare']['p50']:.4f}.", ""]
    rss, pct = d["rss_mib"], d["cpu_pct"]
    out += ["**Idle, one model (medium) loaded, 5 s**", "",
            table(("figure", "agent (edge-agent run, one model)", "bare process (baseline)", "difference", "goal"), [
                ("RSS", f"{rss['agent']:.1f} MiB", f"{rss['bare']:.1f} MiB", f"+{rss['agent'] - rss['bare']:.1f} MiB",
                 f"≤ +{d['goals']['rss_mb']:g} MiB"),
                ("CPU", f"{pct['agent']:.2f} % of a core", f"{pct['bare']:.2f} %", f"{pct['agent'] - pct['bare']:+.2f} pt",
                 f"≤ {d['goals']['cpu_pct']:g} %")]),
            "", f"![latency distributions]({LATENCY_PLOT.as_posix()})"]
    return out


def section_rollback(r: dict[str, Any]) -> list[str]:
    """Rollback time from the agent_overhead run."""
    d = r.get("data")
    if not isinstance(d, dict) or not d.get("rollback_s"):
        return []
    import statistics

    times = d["rollback_s"]
    bare_s = d["quantiles_us"]["medium"]["bare"]["p50"] / 1e6 if "quantiles_us" in d else None
    median = statistics.median(times)
    return [
        "Measured by `bench/agent_overhead.py` on the real agent (`edge-agent run`) serving the medium model: "
        "a new version is installed, then the operator's rollback is sent through the agent's admin API (as "
        "`edge-agent rollback` sends it), and a client polling in a loop records when a request sent after the "
        "trigger is answered by the previous version.", "",
        table(("figure", "value", "baseline (same run)", "ratio", "goal"), [
            (f"rollback, median of {len(times)}", f"{median:.3f} s",
             f"one bare invoke {bare_s:.4f} s" if bare_s else None,
             f"{median / bare_s:.0f}×" if bare_s else None, f"≤ {d['goals']['rollback_s']:g} s"),
            ("rollback, max", f"{max(times):.3f} s", None, None, None)]),
    ]


_PUSH_CHUNK = re.compile(r"^chunk (\d+) KiB: (\d+) chunks, ([\d.]+) MB on the wire")
_PUSH_ROW = re.compile(r"^\s+(baseline|push|republish|probe|raw receive)\s+([\d.]+) s\s+([\d.]+) MB/s")


def section_push(r: dict[str, Any]) -> list[str]:
    """Publish and receive speeds per chunk size, against raw paho on the same broker."""
    sizes: dict[str, dict[str, float]] = {}
    current = None
    for line in r.get("stdout", "").splitlines():
        m = _PUSH_CHUNK.match(line)
        if m:
            current = f"{m.group(1)} KiB ({m.group(2)} chunks, {m.group(3)} MB)"
            sizes[current] = {}
            continue
        m = _PUSH_ROW.match(line)
        if m and current is not None:
            sizes[current][m.group(1)] = float(m.group(3))
    rows = []
    for label, v in sizes.items():
        if not {"baseline", "push", "probe", "raw receive"} <= set(v):
            continue
        rows.append((label, _num(v["baseline"]), _num(v["push"]), f"{v['push'] / v['baseline']:.2f}",
                     _num(v.get("republish")), _num(v["raw receive"]), _num(v["probe"]),
                     f"{v['probe'] / v['raw receive']:.2f}"))
    if not rows:
        return []
    return ["`bench/push.py`: a 20 MB artifact of float32 weights on one Mosquitto on loopback, best of its rounds "
            "(its output below says how many chunks went compressed). Baselines, same run: raw paho publishing the "
            "same payloads retained at QoS 1 and waiting for every PUBACK; raw paho subscribing to the same retained "
            "chunks. Push includes nothing of the host's chunking and compression, which the output times apart.", "",
            table(("chunk size", "raw paho publish MB/s (baseline)", "edgectl push MB/s", "ratio", "republish MB/s",
                   "raw paho receive MB/s (baseline)", "Transport receive MB/s", "ratio"), rows)]


_FLEET = {
    "base": re.compile(r"single agent alone \(baseline\): committed ([\d.]+) s"),
    "partial": re.compile(r"only (\d+) of (\d+) committed within ([\d.]+) s"),
    "failed": re.compile(r"FAILED on (\d+) agent\(s\), e\.g\. (.*)"),
    "fleet": re.compile(r"(\d+) agents: first committed ([\d.]+) s, median ([\d.]+) s, all activated ([\d.]+) s, "
                        r"all committed ([\d.]+) s"),
    "stream": re.compile(r"fleet telemetry into one collector: .*?= (\d+) msg/s \(the agents send (\d+) msg/s"),
    "raw": re.compile(r"bare paho subscriber counting \(baseline\): (\d+) msg/s"),
    "ours": re.compile(r"edgectl fleet collect \([^)]*\): (\d+) msg/s"),
    "cpu": re.compile(r"idle agent with one model over ([\d.]+) s: ([\d.]+) % of one core with telemetry every 1 s; "
                      r"([\d.]+) % with telemetry every hour"),
}


def section_fleet(r: dict[str, Any]) -> list[str]:
    """Rollout time, collector rate and idle CPU, each against its baseline."""
    text = r.get("stdout", "")
    m = {k: rx.search(text) for k, rx in _FLEET.items()}
    rows = []
    if m["base"] and m["fleet"]:
        base, f = float(m["base"].group(1)), m["fleet"]
        rows.append((f"{f.group(1)} agents: all committed after the group document", f"{float(f.group(5)):.2f} s",
                     f"one agent alone: {base:.2f} s", f"{float(f.group(5)) / base:.1f}×", "≤ 60 s for 200 agents"))
        rows.append(("first / median agent committed", f"{float(f.group(2)):.2f} / {float(f.group(3)):.2f} s",
                     None, None, None))
    if m["partial"]:
        p = m["partial"]
        rows.append((f"{p.group(2)} agents: committed within {p.group(3)} s", f"only {p.group(1)} of {p.group(2)}",
                     f"one agent alone: {float(m['base'].group(1)):.2f} s" if m["base"] else None, None,
                     "all 200 within 60 s"))
    if m["failed"]:
        rows.append(("agents that failed the deployment", m["failed"].group(1), None, None, "0",))
        rows.append(("first failure", m["failed"].group(2), None, None, None))
    if m["stream"]:
        rows.append(("fleet telemetry into one collector", f"{m['stream'].group(1)} msg/s",
                     f"agents send {m['stream'].group(2)} msg/s",
                     f"{int(m['stream'].group(1)) / max(1, int(m['stream'].group(2))):.2f}", None))
    if m["raw"] and m["ours"]:
        raw, ours = int(m["raw"].group(1)), int(m["ours"].group(1))
        rows.append(("collector under a generator's load", f"{ours:,} msg/s", f"bare paho subscriber: {raw:,} msg/s",
                     f"{ours / raw:.2f}", "≥ 5,000 msg/s"))
    if m["cpu"]:
        on, off = float(m["cpu"].group(2)), float(m["cpu"].group(3))
        rows.append((f"idle agent CPU, telemetry every 1 s ({m['cpu'].group(1)} s window)", f"{on:.2f} % of a core",
                     f"telemetry every hour: {off:.2f} %", f"+{on - off:.2f} pt", "≤ 2 %"))
    if not rows:
        return []
    return [table(("figure", "value", "baseline (same run)", "ratio", "goal"), rows)]


_CLUSTER_RUN = re.compile(r"^  (one Mosquitto \(baseline\)|cluster|cluster, node 2 killed): online after ([\d.]+) s; "
                          r"(?:first committed ([\d.]+) s, median ([\d.]+) s, all committed ([\d.]+) s"
                          r"|only (\d+) committed within ([\d.]+) s)", re.M)
_CLUSTER_KILL = re.compile(r"node 2 killed ([\d.]+) s after the group document, once (\d+) agents had committed; "
                           r"(\d+) of its (\d+) agents had not committed yet")
_CLUSTER_AGENTS = re.compile(r"^(\d+) agents \(", re.M)


def section_cluster(r: dict[str, Any]) -> list[str]:
    """The rollout on the three-node cluster, clean and with a node killed, against one Mosquitto."""
    text = r.get("stdout", "")
    runs = {m.group(1): m for m in _CLUSTER_RUN.finditer(text)}
    n = _CLUSTER_AGENTS.search(text)
    agents = n.group(1) if n else "?"
    base_m = runs.get("one Mosquitto (baseline)")
    base = float(base_m.group(5)) if base_m and base_m.group(5) else None
    rows = []
    for label, goal in (("cluster", "≤ 60 s for 200 agents"), ("cluster, node 2 killed", "≤ 90 s for 200 agents")):
        m = runs.get(label)
        if m is None:
            continue
        if m.group(5) is None:
            value = f"only {m.group(6)} of {agents} within {float(m.group(7)):.0f} s"
            ratio = None
        else:
            value = f"{float(m.group(5)):.2f} s (first {float(m.group(3)):.2f}, median {float(m.group(4)):.2f})"
            ratio = f"{float(m.group(5)) / base:.2f}×" if base else None
        rows.append((f"{agents} agents on three NATS nodes{', one killed mid-rollout' if 'killed' in label else ''}: "
                     "all committed after the group document", value,
                     f"one Mosquitto: {base:.2f} s" if base else None, ratio, goal))
    if not rows:
        return []
    out = ["`bench/fleet_scale.py --cluster`: fresh real agents (the agent's daemon code, several per worker "
           "process) for each rollout; on the cluster agent k starts on node k mod 3 and lists the others after "
           "its own (`mqtt.urls`), MQTT streams are replicated on all three nodes, and the push goes through the "
           "first node. Baseline, same run: the same fleet and push on one Mosquitto.", "",
           table(("figure", "value", "baseline (same run)", "ratio", "goal"), rows)]
    k = _CLUSTER_KILL.search(text)
    if k:
        out += ["", f"The second node was killed {float(k.group(1)):.2f} s after the group document, once "
                    f"{k.group(2)} agents had committed; {k.group(3)} of its {k.group(4)} agents had not committed "
                    "yet and moved to the other nodes."]
    return out


_DELTA = re.compile(r"delta: v2 \(last layer fine-tuned\) fetched (\d+) of (\d+) bytes \((\d+) of (\d+) chunks; "
                    r"(\d+) bytes copied")


def section_delivery(r: dict[str, Any]) -> list[str]:
    """The agent's download against raw paho, the push, and the delta fraction."""
    d = r.get("data")
    if not isinstance(d, dict) or "agent_download_s" not in d:
        return []
    mb = d["wire_bytes"] / 1e6
    raw, fetch, agent = d["raw_pub_sub_s"], d["raw_retained_fetch_s"], d["agent_download_s"]
    rows = [
        ("(a) raw paho publish → subscribe, QoS 1 (baseline)", f"{raw:.3f}", _num(mb / raw), "1.00"),
        ("raw paho fetching the chunks retained on the broker", f"{fetch:.3f}", _num(mb / fetch), f"{raw / fetch:.2f}"),
        ("(b) agent: document → verified artifact on disk", f"{agent:.3f}", _num(mb / agent), f"{raw / agent:.2f}"),
        ("edgectl push: publishing the chunks", f"{d['push_publish_s']:.3f}", _num(mb / d["push_publish_s"]),
         f"{raw / d['push_publish_s']:.2f}"),
        ("edgectl push: chunking and compression (host, before publishing)", f"{d['push_compress_s']:.3f}", None, None),
    ]
    rounds = len(d.get("ratios") or []) or 5
    nats = d.get("nats")
    if isinstance(nats, dict):
        n_raw, n_fetch, n_agent = nats["raw_pub_sub_s"], nats["raw_retained_fetch_s"], nats["agent_download_s"]
        rows += [
            ("one NATS node (MQTT 3.1.1): (a) raw paho publish → subscribe, QoS 1", f"{n_raw:.3f}", _num(mb / n_raw),
             "1.00"),
            ("one NATS node: raw paho fetching the retained chunks", f"{n_fetch:.3f}", _num(mb / n_fetch),
             f"{n_raw / n_fetch:.2f}"),
            ("one NATS node: (b) agent, document → verified artifact on disk", f"{n_agent:.3f}", _num(mb / n_agent),
             f"{n_raw / n_agent:.2f}"),
        ]
    out = [f"A float32 TFLite model of {d['artifact_bytes'] / 1e6:.1f} MB ({mb:.1f} MB on the wire with its golden "
           f"vectors) on one Mosquitto on loopback{', then on one NATS node' if nats else ''}; the agent is a real "
           "`edge-agent run` process downloading versions of the model one after the other, the first one to warm "
           f"it up, then {rounds} timed rounds. Each round times the baselines and the agent one after the other "
           "(baseline (a) three times, taking the median); each figure is the median of the "
           "rounds, and the ratio column is throughput against the baseline (a) on the same broker. "
           "`DELIVERY_RATIO` is the median of the rounds' own ratios.", "",
           table(("measurement", "seconds", "MB/s", "ratio to (a)"), rows)]
    if d.get("ratios"):
        out += ["", "Ratio (b)/(a) of each round: Mosquitto " + ", ".join(f"{x:.2f}" for x in d["ratios"])
                + (("; NATS " + ", ".join(f"{x:.2f}" for x in nats["ratios"])) if isinstance(nats, dict) else "")
                + "."]
    m = _DELTA.search(r.get("stdout", ""))
    if m:
        fetched, total, chunks, all_chunks, local = (int(g) for g in m.groups())
        out += ["", table(("delta: a small CNN, then its last layer fine-tuned (v2)", "value"), [
            ("bytes fetched for v2 / bytes of v2", f"{fetched:,} / {total:,} = {fetched / total:.3f}"),
            ("chunks fetched / chunks of v2", f"{chunks} / {all_chunks}"),
            ("bytes copied from v1 already on the device", f"{local:,}")], "lr")]
    return out


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "delivery": section_delivery,
    "convert_digits": section_convert, "convert_structured": section_structured,
    "agent_overhead": section_overhead, "push": section_push,
    "fleet_scale": section_fleet, "fleet_cluster": section_cluster,
}


def headline_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The KEY=value figures of one benchmark with what they mean and their goal."""
    rows = []
    for key, value in r.get("figures", {}).items():
        text, op, goal = GOALS.get(key, ("", "", None))
        number = _float(value)
        met = _met(number, op, goal) if number is not None and goal is not None else None
        if number is None and goal is not None and value == "none":
            met = "**no**"  # the benchmark could not measure it (e.g. not every agent committed)
        rows.append((f"`{key}`", value, text or None, f"{op} {goal:g}" if goal is not None else None, met))
    return rows


def run_line(r: dict[str, Any]) -> str:
    """How and when a benchmark ran."""
    name = r["name"]
    if r.get("status", "").startswith("not run"):
        return f"`bench/{name}.py`: {r['status']}" + (f" (checked {_date(r.get('started'))})" if r.get("started") else "")
    flags = " ".join(r.get("flags") or [])
    return (f"`bench/{name}.py{(' ' + flags) if flags else ''}`: {r.get('status')}, run {_date(r.get('started'))}, "
            f"took {r.get('seconds', 0):.0f} s; load average {r.get('load_before')} before, {r.get('load_after')} after.")


def benchmark_block(r: dict[str, Any], host_key: str) -> list[str]:
    """Everything the report says about one benchmark."""
    out = [run_line(r), ""]
    if r.get("status", "").startswith("not run"):
        return out
    if r.get("machine") and _machine_key(r["machine"]) != host_key:
        out += ["Measured on another machine than the header's:", "", *machine_lines(r["machine"]), ""]
    if r.get("status") == "ok":
        body = SECTIONS.get(r["name"], lambda _: [])(r)
        if body:
            out += [*body, ""]
    heads = headline_rows(r)
    if heads:
        out += [table(("figure", "value", "meaning", "goal", "met"), heads, "lrlll"), ""]
    if r.get("stdout"):
        out += [f"<details><summary>output of bench/{r['name']}.py</summary>", "", "```text",
                r["stdout"].rstrip("\n"), "```", "", "</details>", ""]
    if r.get("stderr_tail"):
        out += ["<details><summary>last lines of its error output</summary>", "", "```text",
                r["stderr_tail"].rstrip("\n"), "```", "", "</details>", ""]
    return out


def render(results: dict[str, dict[str, Any]], order: list[str], areas: dict[str, str], host: dict[str, Any],
           root: Path) -> str:
    """The whole BENCHMARKS.md."""
    ran = [r for r in results.values() if r.get("started") and not r.get("status", "").startswith("not run")]
    newest = max((r["started"] for r in ran), default=None)
    host_key = _machine_key(host)
    out = ["# Benchmarks", "",
           f"Written by `bench/run_all.py` (`make bench`); latest run {_date(newest)}. Every figure is printed by a "
           "script in `bench/` next to a baseline measured in the same run on the same machine, and the ratio "
           "compares the two; absolute figures depend on the machine and on what else it was doing (the load "
           "average before and after each script is given). Goals are the ones the project set for each area.", "",
           "## Machine", "", *machine_lines(host), ""]
    summary = []
    for name in order:
        r = results[name]
        for row in headline_rows(r):
            summary.append((f"bench/{name}.py", *row))
        if not r.get("figures"):
            summary.append((f"bench/{name}.py", None, r.get("status"), None, None, None))
    out += ["## Summary", "", table(("benchmark", "figure", "value", "meaning", "goal", "met"), summary, "llrlll"), ""]
    for area, title in AREAS:
        names = [n for n in order if areas.get(n, "other") == area]
        if area == "rollback":
            r = results.get("agent_overhead")
            body = section_rollback(r) if r and r.get("status") == "ok" else []
            out += [f"## {title}", "", *(body or ["Not measured: `bench/agent_overhead.py` has no result."]), ""]
            continue
        if not names:
            continue
        out += [f"## {title}", ""]
        for name in names:
            if len(names) > 1:
                out += [f"### bench/{name}.py", ""]
            out += benchmark_block(results[name], host_key)
    return "\n".join(out).rstrip("\n") + "\n"
