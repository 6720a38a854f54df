"""The fleet table: one row per device from FleetObserver views, laid out to fit a width.

Telemetry is not retained (docs/protocol.md §1), so a fresh observer knows the figures of a device
only once it has published again; `wait_for_telemetry` waits for that, at most a given time.

The table is for terminals from 80 columns up and for pipes: device, model, version and phase are
always shown; the other columns come in by priority, abbreviated before they are dropped, so a
number is never cut in the middle (`layout`). The keys of the live view (`WatchState`, `decode_keys`)
and the terminal mode they need (`cbreak`) live here too, apart from the refresh loop, so they can be
tested without a terminal.
"""

from __future__ import annotations

import contextlib
import re
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from rich.cells import cell_len, set_cell_size
from rich.text import Text

from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.protocol.documents import ModelDrift
from edgefleet.protocol.phases import Phase

SORT_KEYS = ("device", "cpu", "rss", "p95", "last-event")
REASON_CHARS = 48
ELLIPSIS = "…"
PIPE_WIDTH = 80
"""Width of piped output when $COLUMNS does not say."""


@dataclass(frozen=True)
class ModelCell:
    """One model on one device: what the state says, with the latency figures telemetry adds."""

    name: str
    version: int | None
    phase: str
    p50_ms: float | None = None
    p95_ms: float | None = None
    shadow: str | None = None
    """In SHADOW: `120/200 98.3%` (requests compared of those needed, agreement so far)."""
    drift: float | None = None
    """The largest drift score (PSI) over the model's inputs and outputs, from telemetry."""
    drifting: bool = False
    """A score is past the device's drift threshold (a DRIFT event was raised and has not recovered)."""

    @property
    def phase_text(self) -> str:
        """The phase, with the shadow figures while in SHADOW: `SHADOW 120/200 98.3%`."""
        return f"{self.phase} {self.shadow}" if self.shadow else str(self.phase)

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


def shorten(text: str, limit: int = REASON_CHARS) -> str:
    """One line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + ELLIPSIS


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
        shadow = state.shadow.text if state is not None and state.shadow is not None \
            and state.phase == Phase.SHADOW else None
        cells.append(ModelCell(name, version, phase, fig.p50_ms if fig else None, fig.p95_ms if fig else None,
                               shadow, *_drift(fig.drift if fig else None)))
    text, ts = last_event(view)
    return Row(
        device_id=view.device_id, online=view.online, groups=view.groups, models=tuple(cells),
        cpu_percent=tel.cpu_percent if tel else None, rss_mb=tel.rss_bytes / 1e6 if tel else None,
        temperature_c=tel.temperature_c if tel else None, last_event=text, last_event_ts=ts,
        telemetry_age_s=max(0.0, now - tel.ts) if tel else None,
    )


def matches(row: Row, text: str) -> bool:
    """True when `text` (case-insensitive) is part of the device id or of one of its model names."""
    needle = text.casefold()
    return needle in row.device_id.casefold() or any(needle in m.name.casefold() for m in row.models)


def rows(views: Iterable[DeviceView], *, group: str | None = None, sort: str = "device",
         text: str | None = None, now: float | None = None) -> list[Row]:
    """Rows for the devices (of `group`, whose id or a model name contains `text`), sorted by `sort`
    (figures: largest first, missing last)."""
    made = [make_row(v, now) for v in views if group is None or group in v.groups]
    if text:
        made = [r for r in made if matches(r, text)]
    made.sort(key=lambda r: r.device_id)
    keys: dict[str, Callable[[Row], float | None]] = {
        "cpu": lambda r: r.cpu_percent, "rss": lambda r: r.rss_mb, "p95": lambda r: r.p95_ms,
        "last-event": lambda r: r.last_event_ts or None,
    }
    if sort in keys:
        key = keys[sort]
        made.sort(key=lambda r: (key(r) is None, -(key(r) or 0.0)))  # stable: ties stay by device id
    return made


# ---------------------------------------------------------------------- columns and layout


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ms_short(value: float | None) -> str:
    """Three significant figures or so in at most five characters: 0.125, 1.50, 12.3, 123, 12345."""
    if value is None:
        return ""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 \
        else f"{value:.0f}"


Cell = Callable[[Row, "ModelCell | None"], str]


@dataclass(frozen=True)
class Variant:
    """One way to show a column: its header and cell text. `cut` cells may end in '…' when narrow."""

    header: str
    cell: Cell


@dataclass(frozen=True)
class Column:
    """A column of the table. Priority 0 columns are always shown; the others come in by priority
    (1 first) when there is room, in their shortest variant first, then widened in the same order."""

    key: str
    priority: int
    variants: tuple[Variant, ...]
    align: str = "left"
    per_model: bool = False
    """A cell per model line; the other columns fill only a device's first line."""
    cut: bool = False
    """Text that may be cut with '…' (never numbers)."""
    flex: bool = False
    """Takes the width left over, up to its natural width."""
    min_width: int = 0


def _per_model(get: Callable[[ModelCell], str]) -> Cell:
    return lambda row, model: get(model) if model is not None else "-"


def _drift(drift: ModelDrift | None) -> tuple[float | None, bool]:
    """A model's drift as the table shows it: its largest score, and whether it is past the threshold."""
    if drift is None:
        return None, False
    scores = [v for v in (*drift.inputs.values(), drift.outputs) if v is not None]
    return (max(scores) if scores else None), bool(drift.drifting)


def _drift_text(m: ModelCell) -> str:
    if m.drift is None:
        return ""
    return f"{m.drift:.2f}" + ("!" if m.drifting else "")


def _figure(get: Callable[[ModelCell], str]) -> Cell:
    return lambda row, model: get(model) if model is not None else ""


COLUMN_SPECS: tuple[Column, ...] = (
    Column("device", 0, (Variant("device", lambda r, m: r.device_id),), cut=True, min_width=4),
    Column("online", 1, (Variant("on", lambda r, m: "yes" if r.online else "no"),
                         Variant("online", lambda r, m: "yes" if r.online else "no"))),
    Column("groups", 9, (Variant("groups", lambda r, m: ",".join(r.groups) or "-"),), cut=True, min_width=6),
    Column("model", 0, (Variant("model", _per_model(lambda m: m.name)),), per_model=True, cut=True, min_width=4),
    Column("version", 0, (Variant("ver", _per_model(lambda m: "-" if m.version is None else f"v{m.version}")),),
           per_model=True),
    Column("phase", 0, (Variant("phase", _per_model(lambda m: m.phase_text)),), per_model=True, cut=True,
           min_width=4),
    Column("p50", 7, (Variant("p50", _figure(lambda m: _ms_short(m.p50_ms))),
                      Variant("p50 ms", _figure(lambda m: _num(m.p50_ms, 3)))), align="right", per_model=True),
    Column("p95", 2, (Variant("p95", _figure(lambda m: _ms_short(m.p95_ms))),
                      Variant("p95 ms", _figure(lambda m: _num(m.p95_ms, 3)))), align="right", per_model=True),
    Column("drift", 10, (Variant("drift", _figure(_drift_text)),), align="right", per_model=True),
    Column("cpu", 3, (Variant("cpu", lambda r, m: _num(r.cpu_percent, 0)),
                      Variant("cpu %", lambda r, m: _num(r.cpu_percent, 1))), align="right"),
    Column("rss", 5, (Variant("rss", lambda r, m: _num(r.rss_mb, 0)),
                      Variant("rss MB", lambda r, m: _num(r.rss_mb, 1))), align="right"),
    Column("temp", 8, (Variant("°C", lambda r, m: _num(r.temperature_c, 0)),
                       Variant("temp °C", lambda r, m: _num(r.temperature_c, 1))), align="right"),
    Column("last-event", 4, (Variant("last event", lambda r, m: r.last_event),), cut=True, flex=True, min_width=18),
    Column("seen", 6, (Variant("seen", lambda r, m: "" if r.telemetry_age_s is None else f"{r.telemetry_age_s:.0f}s"),
                       Variant("seen", lambda r, m: "" if r.telemetry_age_s is None
                               else f"{r.telemetry_age_s:.0f} s")), align="right"),
)
COLUMN_KEYS = tuple(c.key for c in COLUMN_SPECS)


@dataclass(frozen=True)
class Placed:
    """A column as laid out: which variant, how wide."""

    column: Column
    variant: Variant
    width: int


@dataclass(frozen=True)
class Line:
    """One line of the table: its text (at most the layout's width) and what styling needs."""

    text: str
    row: Row | None = None
    model: ModelCell | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Column key -> (start, end) of its cell in `text`."""


def row_lines(row: Row) -> list[ModelCell | None]:
    """The lines of a device: one per model, at least one."""
    return list(row.models) or [None]


def _cell(column: Column, variant: Variant, row: Row, model: ModelCell | None, first: bool,
          repeat_device: bool) -> str:
    if not first and not column.per_model and not (repeat_device and column.key == "device"):
        return ""
    return variant.cell(row, model)


def _natural(column: Column, variant: Variant, table_rows: Sequence[Row], repeat_device: bool) -> int:
    width = cell_len(variant.header)
    for row in table_rows:
        for i, model in enumerate(row_lines(row)):
            width = max(width, cell_len(_cell(column, variant, row, model, i == 0, repeat_device)))
    return width


def layout(table_rows: Sequence[Row], width: int | None, *, repeat_device: bool = False) -> tuple[list[Placed], int]:
    """The columns to show in `width` cells (None: every column at full width) and the gap between them.

    Device, model, version and phase always; then, by priority, each other column in its shortest
    variant while it fits; then, in the same order, each widened to its full variant (the last event
    and the groups: as far as their text goes), so a more important column is wider first. When even the four do not fit, the gap shrinks to one and device, model and
    phase are cut with '…' (the version never)."""
    naturals = {(c.key, v.header): _natural(c, v, table_rows, repeat_device) for c in COLUMN_SPECS for v in c.variants}

    def nat(c: Column, v: Variant) -> int:
        return naturals[(c.key, v.header)]

    if width is None:
        return [Placed(c, c.variants[-1], nat(c, c.variants[-1])) for c in COLUMN_SPECS], 2
    gap = 2
    chosen: dict[str, Placed] = {c.key: Placed(c, c.variants[0], nat(c, c.variants[0]))
                                 for c in COLUMN_SPECS if c.priority == 0}

    def total(placed: Iterable[Placed], sep: int) -> int:
        items = list(placed)
        return sum(p.width for p in items) + sep * (len(items) - 1)

    if total(chosen.values(), gap) > width:
        gap = 1
        widths = {k: p.width for k, p in chosen.items()}
        while sum(widths.values()) + gap * (len(widths) - 1) > width:
            shrinkable = [k for k in ("device", "model") if widths[k] > chosen[k].column.min_width]
            if not shrinkable:
                shrinkable = [k for k in ("phase",) if widths[k] > chosen[k].column.min_width]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda k: widths[k])
            widths[widest] -= 1
        placed = {k: Placed(p.column, p.variant, widths[k]) for k, p in chosen.items()}
        return [placed[c.key] for c in COLUMN_SPECS if c.key in placed], gap

    optional = sorted((c for c in COLUMN_SPECS if c.priority > 0), key=lambda c: c.priority)
    for c in optional:
        v = c.variants[0]
        w = min(nat(c, v), c.min_width) if c.flex or c.cut and c.min_width else nat(c, v)
        w = max(w, cell_len(v.header))
        candidate = Placed(c, v, w)
        if total([*chosen.values(), candidate], gap) <= width:
            chosen[c.key] = candidate
    for c in optional:  # then, by priority, each widened: to its full variant, or as far as its text goes
        p = chosen.get(c.key)
        if p is None:
            continue
        others = [q for k, q in chosen.items() if k != c.key]
        if c.flex or c.cut:
            spare = width - total(chosen.values(), gap)
            chosen[c.key] = Placed(c, p.variant, min(nat(c, p.variant), p.width + max(0, spare)))
            continue
        wider = Placed(c, c.variants[-1], nat(c, c.variants[-1]))
        if total([*others, wider], gap) <= width:
            chosen[c.key] = wider
    return [chosen[c.key] for c in COLUMN_SPECS if c.key in chosen], gap


def fit(text: str, width: int, align: str = "left") -> str:
    """`text` in exactly `width` cells: padded, or cut with '…'."""
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + ELLIPSIS if width > 0 else ""
    pad = " " * (width - cell_len(text))
    return pad + text if align == "right" else text + pad


def table_lines(table_rows: Sequence[Row], width: int | None, *, repeat_device: bool = False) -> list[Line]:
    """The column headers and then a line per model of every device (one for a device without models),
    each at most `width` cells (None: every column, however wide). With `repeat_device` the device id
    starts each of its lines (for grep), else only its first."""
    placed, gap = layout(table_rows, width, repeat_device=repeat_device)

    def join(cells: list[tuple[str, str]]) -> tuple[str, dict[str, tuple[int, int]]]:
        text, spans = "", {}
        for key, cell in cells:
            if text:
                text += " " * gap
            spans[key] = (len(text), len(text) + len(cell))
            text += cell
        return text.rstrip(), spans

    header, spans = join([(p.column.key, fit(p.variant.header, p.width, p.column.align)) for p in placed])
    out = [Line(header, spans=spans)]
    for row in table_rows:
        for i, model in enumerate(row_lines(row)):
            cells = [(p.column.key, fit(_cell(p.column, p.variant, row, model, i == 0, repeat_device), p.width,
                                        p.column.align)) for p in placed]
            text, spans = join(cells)
            out.append(Line(text, row=row, model=model, spans=spans))
    if width is not None:  # narrower than device, version and the shortest model and phase
        out = [Line(fit(line.text, width).rstrip(), line.row, line.model, line.spans) if cell_len(line.text) > width
               else line for line in out]
    return out


def public_url(url: str) -> str:
    """The broker url without user info (`mqtt://user:secret@host` -> `mqtt://host`)."""
    return re.sub(r"^([a-z]+://)[^/@]*@", r"\1", url)


PHASE_ORDER = (Phase.ROLLED_BACK, Phase.REJECTED, Phase.DOWNLOADING, Phase.VERIFYING, Phase.VALIDATING,
               Phase.SHADOW, Phase.ACTIVATING, Phase.PROBATION, Phase.COMMITTED, Phase.IDLE)
"""Phases in the header: failures first, then updates under way, then the resting ones."""


def header_line(table_rows: Sequence[Row], *, broker: str, group: str | None, text: str | None, sort: str,
                width: int | None, clock: Callable[[], float] = time.time) -> str:
    """`mqtt://host:1883 · group lab · filter 'cam' · 3 devices, 2 online · 1 ROLLED_BACK, 2 COMMITTED ·
    sort cpu · 12:00:01`: what is shown, from where, in at most `width` cells. The broker, the group and
    filter when set, and the counts always (cut with '…' when even they do not fit); then while there is
    room, in this order: the models shown by phase, failures first (as many as fit, '…' for the rest),
    `all groups` when no group is set, the sort key, the time."""
    online = sum(1 for r in table_rows if r.online)
    devices = f"{len(table_rows)} device{'' if len(table_rows) == 1 else 's'}, {online} online"
    parts: list[str | None] = [public_url(broker), f"group {group}" if group else None]
    if text:
        parts.append(f"filter {text!r}")
    parts.append(devices)

    def joined(candidate: list[str | None]) -> str:
        return " · ".join(p for p in candidate if p is not None)

    def fits(candidate: list[str | None]) -> bool:
        return width is None or cell_len(joined(candidate)) <= width

    if not fits(parts):
        return fit(joined(parts), width or 0)
    counts = Counter(str(m.phase) for r in table_rows for m in r.models)
    order = {str(p): i for i, p in enumerate(PHASE_ORDER)}
    phases = [f"{n} {p}" for p, n in sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))]
    for shown in range(len(phases), 0, -1):
        part = ", ".join(phases[:shown]) + ("" if shown == len(phases) else ", …")
        if fits([*parts, part]):
            parts.append(part)
            break
    if group is None and fits([parts[0], "all groups", *parts[2:]]):
        parts[1] = "all groups"
    for part in (f"sort {sort}", time.strftime("%H:%M:%S", time.localtime(clock()))):
        if not fits([*parts, part]):
            break
        parts.append(part)
    return joined(parts)


def plain_text(table_rows: Sequence[Row], width: int | None, *, broker: str, group: str | None = None,
               text: str | None = None, sort: str = "device") -> str:
    """The header line and the table as plain text, no line longer than `width` (None: every column)."""
    lines = [header_line(table_rows, broker=broker, group=group, text=text, sort=sort, width=width)]
    lines += [line.text for line in table_lines(table_rows, width, repeat_device=True)]
    return "\n".join(lines)


# ---------------------------------------------------------------------- the live view on a terminal

PHASE_STYLES = {
    Phase.COMMITTED.value: "green", Phase.ROLLED_BACK.value: "bold red", Phase.REJECTED.value: "bold red",
    Phase.PROBATION.value: "yellow", Phase.DOWNLOADING.value: "cyan", Phase.VERIFYING.value: "cyan",
    Phase.VALIDATING.value: "cyan", Phase.SHADOW.value: "magenta", Phase.ACTIVATING.value: "cyan",
}
KEYS_HELP = "q quit · / filter · s sort · g group · Esc clear filter"


def styled(line: Line) -> Text:
    """A table line for the terminal: offline devices dim, phases coloured, the header bold."""
    out = Text(line.text, no_wrap=True, overflow="crop")
    if line.row is None:
        out.stylize("bold reverse")
        return out
    if not line.row.online:
        out.stylize("dim")
    phase = line.spans.get("phase")
    if phase is not None and line.model is not None:
        style = PHASE_STYLES.get(str(line.model.phase))
        if style:
            out.stylize(style, *phase)
    return out


@dataclass
class WatchState:
    """What the live view shows, changed by keys: sort key, group, filter text, and the filter being typed."""

    sort: str = "device"
    group: str | None = None
    text: str | None = None
    editing: str | None = None
    """The filter as typed so far after '/', until Enter applies it or Esc drops it; None when not typing."""
    quit: bool = False

    def key(self, key: str, groups: Sequence[str] = ()) -> None:
        """Take one key from `decode_keys`; `groups` are the groups `g` cycles through."""
        if self.editing is not None:
            if key == "enter":
                self.text = self.editing.strip() or None
                self.editing = None
            elif key == "esc":
                self.editing = None
            elif key == "backspace":
                self.editing = self.editing[:-1]
            elif len(key) == 1 and key.isprintable():
                self.editing += key
            return
        if key == "q":
            self.quit = True
        elif key == "/":
            self.editing = self.text or ""
        elif key == "esc":
            self.text = None
        elif key == "s":
            self.sort = SORT_KEYS[(SORT_KEYS.index(self.sort) + 1) % len(SORT_KEYS)] if self.sort in SORT_KEYS \
                else SORT_KEYS[0]
        elif key == "g":
            cycle: list[str | None] = [None, *sorted(set(groups))]
            self.group = cycle[(cycle.index(self.group) + 1) % len(cycle)] if self.group in cycle else cycle[0]

    def footer(self, more: int = 0) -> str:
        """The line under the table: the filter being typed, else the keys (and how many rows are hidden)."""
        if self.editing is not None:
            return f"filter (device or model): {self.editing}▏  Enter applies · Esc cancels"
        hidden = f"… {more} more line{'' if more == 1 else 's'} (/ filters) · " if more else ""
        return f"{hidden}{KEYS_HELP} · sorted by {self.sort}"


def decode_keys(data: bytes) -> list[str]:
    """Keys from what a terminal in cbreak mode sent: single characters, 'enter', 'esc', 'backspace'.

    An escape sequence (arrow and function keys: ESC [ ... or ESC O x) is dropped whole; a lone ESC
    is the Esc key."""
    keys: list[str] = []
    text = data.decode("utf-8", errors="ignore")
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x1b":
            if i + 1 < len(text) and text[i + 1] == "[":
                j = i + 2
                while j < len(text) and not "\x40" <= text[j] <= "\x7e":
                    j += 1
                i = j + 1
                continue
            if i + 1 < len(text) and text[i + 1] == "O":
                i += 3
                continue
            keys.append("esc")
        elif ch in "\r\n":
            keys.append("enter")
        elif ch in "\x7f\x08":
            keys.append("backspace")
        elif ch.isprintable():
            keys.append(ch)
        i += 1
    return keys


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """The terminal on `fd` in cbreak mode (keys arrive one by one, not echoed; Ctrl-C still interrupts),
    restored however the block ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


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
