"""The fleet table: one row per device from FleetObserver views, as a rich table or plain text.

Telemetry is not retained (docs/protocol.md §1), so a fresh observer knows the figures of a device
only once it has published again; `wait_for_telemetry` waits for that, at most a given time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.table import Table

from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.protocol.phases import Phase

SORT_KEYS = ("device", "cpu", "rss", "p95", "last-event")
COLUMNS = ("device", "online", "groups", "models", "p50 ms", "p95 ms", "cpu %", "rss MB", "temp °C",
           "last event", "seen")
REASON_CHARS = 48


@dataclass(frozen=True)
class ModelCell:
    """One model on one device: what the state says, with the latency figures telemetry adds."""

    name: str
    version: int | None
    phase: str
    p50_ms: float | None = None
    p95_ms: float | None = None

    @property
    def label(self) -> str:
        """`det v3 COMMITTED`."""
        version = f" v{self.version}" if self.version is not None else ""
        return f"{self.name}{version} {self.phase}"


@dataclass(frozen=True)
class Row:
    """One device as the table shows it."""

    device_id: str
    online: bool
    groups: tuple[str, ...]
    models: tuple[ModelCell, ...]
    cpu_percent: float | None
    rss_mb: float | None
    temperature_c: float | None
    last_event: str
    last_event_ts: float
    telemetry_age_s: float | None

    @property
    def p95_ms(self) -> float | None:
        """The worst p95 over the device's models."""
        values = [m.p95_ms for m in self.models if m.p95_ms is not None]
        return max(values) if values else None

    def cells(self) -> list[list[str]]:
        """Every column's text, one entry per line (models take a line each)."""
        return [
            [self.device_id], ["yes" if self.online else "no"], [", ".join(self.groups) or "-"],
            [m.label for m in self.models] or ["-"],
            [_num(m.p50_ms, 3) for m in self.models] or [""], [_num(m.p95_ms, 3) for m in self.models] or [""],
            [_num(self.cpu_percent, 1)], [_num(self.rss_mb, 1)], [_num(self.temperature_c, 1)],
            [self.last_event], ["" if self.telemetry_age_s is None else f"{self.telemetry_age_s:.0f} s"],
        ]


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def shorten(text: str, limit: int = REASON_CHARS) -> str:
    """One line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def last_event(view: DeviceView) -> tuple[str, float]:
    """The latest event seen (`m ROLLED_BACK: why`), else the last outcome from the retained state."""
    if view.events:
        e = view.events[-1]
        version = f" v{e.version}" if e.version is not None else ""
        reason = f": {shorten(e.reason)}" if e.reason else ""
        return f"{e.model}{version} {e.step}{reason}", e.ts
    best: tuple[str, float] = ("", 0.0)
    if view.state is not None:
        for name, m in view.state.models.items():
            o = m.last_outcome
            if o is not None and o.ts >= best[1]:
                reason = f": {shorten(o.reason)}" if o.reason else ""
                best = (f"{name} v{o.version} {o.result.upper()}{reason}", o.ts)
    return best


def make_row(view: DeviceView, now: float | None = None) -> Row:
    """The row of one device."""
    now = time.time() if now is None else now
    tel = view.telemetry
    figures = {m.name: m for m in tel.models} if tel is not None else {}
    names = sorted(set(view.state.models if view.state is not None else ()) | set(figures))
    cells = []
    for name in names:
        state = view.model(name)
        fig = figures.get(name)
        version = state.active.version if state is not None and state.active is not None else (
            fig.version if fig is not None else None)
        phase = state.phase if state is not None else (fig.phase if fig is not None else Phase.IDLE)
        cells.append(ModelCell(name, version, phase, fig.p50_ms if fig else None, fig.p95_ms if fig else None))
    text, ts = last_event(view)
    return Row(
        device_id=view.device_id, online=view.online, groups=view.groups, models=tuple(cells),
        cpu_percent=tel.cpu_percent if tel else None, rss_mb=tel.rss_bytes / 1e6 if tel else None,
        temperature_c=tel.temperature_c if tel else None, last_event=text, last_event_ts=ts,
        telemetry_age_s=max(0.0, now - tel.ts) if tel else None,
    )


def rows(views: Iterable[DeviceView], *, group: str | None = None, sort: str = "device",
         now: float | None = None) -> list[Row]:
    """Rows for the devices (of `group`), sorted by `sort` (figures: largest first, missing last)."""
    made = [make_row(v, now) for v in views if group is None or group in v.groups]
    made.sort(key=lambda r: r.device_id)
    keys: dict[str, Callable[[Row], float | None]] = {
        "cpu": lambda r: r.cpu_percent, "rss": lambda r: r.rss_mb, "p95": lambda r: r.p95_ms,
        "last-event": lambda r: r.last_event_ts or None,
    }
    if sort in keys:
        key = keys[sort]
        made.sort(key=lambda r: (key(r) is None, -(key(r) or 0.0)))  # stable: ties stay by device id
    return made


def rich_table(table_rows: list[Row], title: str | None = None) -> Table:
    """The rows as a rich Table (multi-line cells for devices with several models)."""
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col.endswith(("ms", "%", "MB", "°C", "seen")) else "left",
                         no_wrap=col != "last event")
    for r in table_rows:
        style = None if r.online else "dim"
        table.add_row(*("\n".join(lines) for lines in r.cells()), style=style)
    return table


def plain_table(table_rows: list[Row]) -> str:
    """The rows as aligned plain text, one line per device (several models joined by '; ')."""
    lines = [list(COLUMNS)] + [["; ".join(c) for c in r.cells()] for r in table_rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for line in lines:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(out)


def summary_line(table_rows: list[Row], group: str | None, sort: str) -> str:
    """`3 device(s), 2 online · group lab · sorted by cpu · 12:00:01`."""
    online = sum(1 for r in table_rows if r.online)
    parts = [f"{len(table_rows)} device(s), {online} online"]
    if group:
        parts.append(f"group {group}")
    parts += [f"sorted by {sort}", time.strftime("%H:%M:%S")]
    return " · ".join(parts)


def wait_for_telemetry(observer: FleetObserver, timeout: float, group: str | None = None,
                       clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait until every online device (of `group`) has sent telemetry, at most `timeout`; True if all did."""
    deadline = clock() + timeout
    seen = observer.version
    while True:
        missing = [v for v in observer.devices().values()
                   if v.online and v.telemetry is None and (group is None or group in v.groups)]
        remaining = deadline - clock()
        if not missing:
            return True
        if remaining <= 0:
            return False
        seen = observer.wait_change(seen, min(remaining, 0.5))
