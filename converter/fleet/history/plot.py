"""`fleet history --plot FILE.png`: the figures of each version over time, with the deployments marked.

Panels, sharing the time axis: p50 (dashed) and p95 (solid) latency, error rate, the agent's CPU, its
resident memory, and drift when any sample has a score. One colour per model version, one line per
device and version; vertical lines mark outcomes (green committed, orange rejected, red rolled back).
matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from edgefleet.converter.fleet.history.query import History
from edgefleet.errors import UsageError

MARKERS = {"committed": "tab:green", "rejected": "tab:orange", "rolled_back": "tab:red"}


def plot(history: History, out: Path, title: str) -> None:
    """Write the PNG; a one-line error when matplotlib is missing or the file cannot be written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from err
    has_drift = any(x.drift is not None for s in history.segments for x in s.series)
    panels = ["latency (ms)", "error rate", "CPU (% of a core)", "memory (MB)"] + (["drift"] if has_drift else [])
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(11, 2.3 * len(panels) + 0.8), squeeze=False)
    axs = [a[0] for a in axes]
    versions = sorted({(s.model, s.version) for s in history.segments}, key=lambda v: (v[0], v[1] or -1))
    colours = {v: f"C{i % 10}" for i, v in enumerate(versions)}
    labelled: set[tuple[str, int | None]] = set()
    for s in history.segments:
        if not s.series:
            continue
        when = [datetime.fromtimestamp(x.ts) for x in s.series]
        colour = colours[(s.model, s.version)]
        label = None
        if (s.model, s.version) not in labelled:
            labelled.add((s.model, s.version))
            label = f"{s.model} v{s.version}" if s.version is not None else f"{s.model} (none)"
        axs[0].plot(when, [x.p95_ms for x in s.series], color=colour, label=label, marker=".", markersize=3)
        axs[0].plot(when, [x.p50_ms for x in s.series], color=colour, linestyle="--", linewidth=0.8)
        axs[1].plot(when, [x.error_rate for x in s.series], color=colour, marker=".", markersize=3)
        axs[2].plot(when, [x.cpu_percent for x in s.series], color=colour)
        axs[3].plot(when, [x.rss_bytes / 1e6 if x.rss_bytes is not None else None for x in s.series], color=colour)
        if has_drift:
            axs[4].plot(when, [x.drift for x in s.series], color=colour)
    shown: set[str] = set()
    for d in history.deployments:
        marker = MARKERS.get(d["result"])
        if marker is None:
            continue
        for ax in axs:
            ax.axvline(datetime.fromtimestamp(d["ts"]), color=marker, linewidth=1, alpha=0.7,
                       label=None if ax is not axs[0] or d["result"] in shown else d["result"].replace("_", " "))
        shown.add(d["result"])
    for ax, name in zip(axs, panels, strict=True):
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axs[1].set_ylim(bottom=0)
    if versions or shown:
        axs[0].legend(loc="upper left", fontsize="small", ncol=4)
    axs[-1].xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M:%S"))  # type: ignore[no-untyped-call]
    # the span the data covers (a `--since 7d` over an hour of data would squeeze it to a line)
    times = [t for s in history.segments for t in (s.start, s.end)] + [d["ts"] for d in history.deployments]
    lo, hi = (min(times), max(times)) if times else (history.since, history.until)
    pad = max((hi - lo) * 0.02, 1.0)
    axs[-1].set_xlim(datetime.fromtimestamp(lo - pad), datetime.fromtimestamp(hi + pad))
    fig.suptitle(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100, format="png")
    except OSError as err:
        raise UsageError(f"--plot {out}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
