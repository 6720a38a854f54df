"""Live progress of a rollout: each targeted device's phase and download, as `push --wait` shows it.

A device reports every lifecycle step of a deployment as an event (in order, on its own topic) and
the share of chunks it holds in its retained state document (at most once a second while a download
runs). `RolloutProgress` folds both into one `DeviceProgress` per targeted device and returns what
changed; the views render those changes for where the output goes: a rich live table on a terminal's
stderr (`LiveTable`), plain lines throttled per device when piped (`PlainLines`), or JSON Lines for
`--json` (`JsonLines`). The verdicts (committed, failed, unfinished) stay with
`edgefleet.converter.fleet.publish.wait_for_rollout`: progress only shows the way there.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.protocol import Event, ModelState
from edgefleet.protocol.documents import ShadowProgress
from edgefleet.protocol.phases import Phase

WAITING = "WAITING"
"""A targeted device that has reported nothing about this deployment yet."""

ORDER: tuple[str, ...] = (WAITING, *(p.value for p in (
    Phase.DOWNLOADING, Phase.VERIFYING, Phase.VALIDATING, Phase.SHADOW, Phase.ACTIVATING, Phase.PROBATION,
    Phase.COMMITTED, Phase.REJECTED, Phase.ROLLED_BACK)))
FAILED: frozenset[str] = frozenset({Phase.REJECTED.value, Phase.ROLLED_BACK.value})
ENDED: frozenset[str] = FAILED | {Phase.COMMITTED.value}
OUTCOME_PHASE: dict[str, str] = {"committed": Phase.COMMITTED.value, "rejected": Phase.REJECTED.value,
                 "rolled_back": Phase.ROLLED_BACK.value}

PLAIN_INTERVAL_S = 5.0
"""Piped output repeats a device's download percentage at most this often (phase changes always show)."""
LIVE_INTERVAL_S = 0.25
"""The live table is redrawn at most this often (and at least once a second, when the rollout wakes)."""
MAX_ROWS = 20
"""Most devices the live table lists one per line; bigger rollouts show counts and the notable devices."""


@dataclass(frozen=True)
class DeviceProgress:
    """Where one targeted device is with the deployment, as edgectl last saw it."""

    device_id: str
    phase: str = WAITING
    bytes: int | None = None
    total: int | None = None
    online: bool = True
    reason: str | None = None
    since: float = 0.0
    """Host time (Unix) the phase was first seen: probation time is counted from here."""
    changed: float = 0.0
    """Host time (Unix) of the latest change."""
    shadow: str | None = None
    """In SHADOW: `120/200 98.3%`, requests compared of those needed and the agreement so far."""

    @property
    def percent(self) -> int | None:
        """Download progress in whole percent, when known."""
        if self.bytes is None or not self.total:
            return None
        return min(100, int(100 * self.bytes / self.total))

    def same(self, other: DeviceProgress) -> bool:
        """The same position, whatever the times: no change to report."""
        return (self.phase, self.bytes, self.online, self.reason, self.shadow) == (
            other.phase, other.bytes, other.online, other.reason, other.shadow)

    def to_event(self) -> dict[str, Any]:
        """One JSON Lines object of `push --wait --json`."""
        doc: dict[str, Any] = {"event": "progress", "device": self.device_id, "phase": self.phase,
                               "bytes": self.bytes, "total": self.total, "online": self.online,
                               "t": round(self.changed, 3)}
        if self.reason is not None:
            doc["reason"] = self.reason
        if self.shadow is not None and self.phase == Phase.SHADOW.value:
            doc["shadow"] = self.shadow
        return doc


def rank(phase: str) -> int:
    """How far along the lifecycle a phase is (the ends last)."""
    return ORDER.index(phase) if phase in ORDER else 0


def state_phase(state: ModelState | None, dep_id: str) -> str | None:
    """The phase of deployment `dep_id` that a retained state document shows, or None when it says nothing
    about that deployment (it may still describe an older one)."""
    if state is None:
        return None
    if state.pending is not None and state.pending.deployment_id == dep_id and state.phase.in_progress:
        return str(state.phase)
    if state.active is not None and state.active.deployment_id == dep_id \
            and state.phase in (Phase.PROBATION, Phase.COMMITTED):
        return str(state.phase)
    if state.last_outcome is not None and state.last_outcome.deployment_id == dep_id:
        return OUTCOME_PHASE.get(state.last_outcome.result)
    return None


class RolloutProgress:
    """Each targeted device's phase and download progress for one deployment, from an observer's documents.

    `poll` is cheap and returns only the devices whose position changed since the previous call, so it
    can run every time the observer wakes.
    """

    def __init__(self, observer: FleetObserver, devices: Iterable[str], name: str, dep_id: str, *,
                 total_bytes: int | None, probation_s: float | None = None,
                 clock: Callable[[], float] = time.time, after: RolloutProgress | None = None) -> None:
        """`after`: a tracker of the same deployment whose devices' positions and place in the event
        stream this one takes over (the group after its canaries)."""
        self.observer = observer
        self.name = name
        self.dep_id = dep_id
        self.total_bytes = total_bytes
        self.probation_s = probation_s
        self.clock = clock
        now = clock()
        self.devices: dict[str, DeviceProgress] = {}
        for d in dict.fromkeys(devices):
            view = observer.get(d)
            # offline already: the caller lists it as pending, so that is no change to report
            self.devices[d] = DeviceProgress(d, total=total_bytes, online=view is not None and view.online,
                                             since=now, changed=now)
        self._cursor = 0
        if after is not None:
            self._cursor = after._cursor
            self.devices.update({d: p for d, p in after.devices.items() if d in self.devices})

    def poll(self) -> list[DeviceProgress]:
        """Take in what arrived since the last call; the devices whose position changed, in order of change."""
        now = self.clock()
        changed: list[DeviceProgress] = []
        events, self._cursor = self.observer.events_after(self._cursor)
        for event in events:
            view = self.observer.get(event.device_id)
            if event.device_id not in self.devices or not self._concerns(event, view):
                continue
            self._set(changed, self._from_event(self.devices[event.device_id], event), now)
        for device, current in list(self.devices.items()):
            view = self.observer.get(device)
            if view is not None:
                self._set(changed, self._from_state(current, view), now)
        return changed

    def _concerns(self, event: Event, view: DeviceView | None) -> bool:
        """An event of this deployment's lifecycle that came on the device's own topic (not a command's answer)."""
        return (event.deployment_id == self.dep_id and event.model == self.name and "command_id" not in event.details
                and view is not None and any(e is event for e in view.events))

    def _from_event(self, p: DeviceProgress, event: Event) -> DeviceProgress:
        phase = event.step.value
        reason = None if event.ok else (event.reason or "no reason given")
        if phase == Phase.SHADOW.value and event.ok:
            return replace(p, phase=phase, bytes=self.total_bytes, reason=None,
                           shadow=shadow_text(event.details) or p.shadow)
        if phase == Phase.DOWNLOADING.value and event.details.get("done"):
            return replace(p, phase=phase, bytes=self.total_bytes, reason=reason)
        if phase == Phase.DOWNLOADING.value and p.phase != phase:
            return replace(p, phase=phase, bytes=0 if self.total_bytes else None, reason=reason)
        if rank(phase) > rank(Phase.DOWNLOADING.value) and phase not in FAILED:
            return replace(p, phase=phase, bytes=self.total_bytes, reason=reason)
        return replace(p, phase=phase, reason=reason)

    def _from_state(self, p: DeviceProgress, view: DeviceView) -> DeviceProgress:
        """The state document moves a device forward only: it is sent at most once a second and may lag
        behind the events."""
        p = replace(p, online=view.online)
        state = view.model(self.name)
        phase = state_phase(state, self.dep_id)
        if phase is None or state is None:
            return p
        if rank(phase) > rank(p.phase):
            failed = state.last_outcome.reason if phase in FAILED and state.last_outcome is not None else None
            done = self.total_bytes if rank(phase) > rank(Phase.DOWNLOADING.value) and phase not in FAILED else p.bytes
            p = replace(p, phase=phase, reason=(failed or "no reason given") if phase in FAILED else None, bytes=done)
        if p.phase == Phase.SHADOW.value and phase == p.phase and state.shadow is not None \
                and state.shadow.samples >= _shadow_samples(p.shadow):
            p = replace(p, shadow=state.shadow.text)
        if p.phase == Phase.DOWNLOADING.value and phase == p.phase and state.progress is not None and self.total_bytes:
            held = round(state.progress * self.total_bytes)
            if p.bytes is None or held > p.bytes:
                p = replace(p, bytes=held)
        return p

    def _set(self, changed: list[DeviceProgress], new: DeviceProgress, now: float) -> None:
        old = self.devices[new.device_id]
        if new.same(old):
            return
        new = replace(new, changed=now, since=now if new.phase != old.phase else old.since)
        self.devices[new.device_id] = new
        # every phase a device went through is shown, even several in one poll; within a phase, the latest
        same = [i for i, c in enumerate(changed) if c.device_id == new.device_id]
        if same and changed[same[-1]].phase == new.phase:
            del changed[same[-1]]
        changed.append(new)

    def probation_left(self, p: DeviceProgress, now: float) -> float | None:
        """Seconds of probation still to run at least (the signed policy's; a device's own may be longer)."""
        if p.phase != Phase.PROBATION.value or not self.probation_s:
            return None
        return max(0.0, self.probation_s - (now - p.since))

    def counts(self) -> Counter[str]:
        """Devices per phase."""
        return Counter(p.phase for p in self.devices.values())


# ---------------------------------------------------------------------- text


def sizes(done: int, total: int) -> str:
    """`9.2/20.6 MiB`: both counts in the unit of the total."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if total >= scale:
            return f"{done / scale:.1f}/{total / scale:.1f} {unit}"
    return f"{done}/{total} B"


def shadow_text(details: dict[str, Any]) -> str | None:
    """`120/200 98.3%` from a SHADOW event's details, or None when it carries no counts (its first one)."""
    samples, needed = details.get("samples"), details.get("min_samples")
    if not isinstance(samples, int) or not isinstance(needed, int):
        return None
    agreement = details.get("agreement")
    return ShadowProgress(samples=samples, min_samples=needed,
                          agreement=agreement if isinstance(agreement, (int, float)) else None).text


def _shadow_samples(text: str | None) -> int:
    """The samples count of a shown `120/200 98.3%` (0 when none is shown): a state document that lags
    behind the events must not take the count back."""
    head = text.split("/", 1)[0] if text else ""
    return int(head) if head.isdigit() else 0


def download_text(p: DeviceProgress) -> str:
    """`45% (9.2/20.6 MiB)`, or '' when the size is unknown."""
    if p.percent is None or p.bytes is None or p.total is None:
        return ""
    return f"{p.percent}% ({sizes(p.bytes, p.total)})"


def progress_line(p: DeviceProgress, probation_s: float | None = None, *, reason: bool = True) -> str:
    """One device's position as a plain line (piped output); without `reason` when a verdict line that
    gives it follows."""
    text = p.phase
    if p.phase == Phase.DOWNLOADING.value and download_text(p):
        text += f" {download_text(p)}"
    elif p.phase == Phase.PROBATION.value and probation_s:
        text += f" for at least {probation_s:g} s"
    elif p.phase == Phase.SHADOW.value and p.shadow:
        text += f" {p.shadow}"
    if p.reason is not None and reason:
        text += f": {p.reason}"
    if not p.online:
        text = f"offline ({text})" if p.phase != WAITING else "offline"
    return f"device {p.device_id}: {text}"


# ---------------------------------------------------------------------- views


class ProgressView(Protocol):
    """Where progress goes."""

    def show(self, changes: list[DeviceProgress]) -> None:
        """Render what changed (called at least once a second while the rollout is followed)."""

    def close(self) -> None:
        """The rollout ended: leave the output clean for the verdict lines."""


class PlainLines:
    """One line per phase change per device; a download's percentage at most every `interval` s."""

    def __init__(self, tracker: RolloutProgress, say: Callable[[str], None], *,
                 interval: float = PLAIN_INTERVAL_S) -> None:
        self.tracker = tracker
        self.say = say
        self.interval = interval
        self._shown: dict[str, tuple[str, bool, str | None, float]] = {}

    def show(self, changes: list[DeviceProgress]) -> None:
        """Print the changes worth a line."""
        now = self.tracker.clock()
        for p in changes:
            if p.phase == WAITING and p.online:
                continue
            last = self._shown.get(p.device_id)
            if last is None or (p.phase, p.online, p.reason) != last[:3] or now - last[3] >= self.interval:
                # a rejection or rollback is followed by the device's verdict line, which has the reason
                self.say(progress_line(p, self.tracker.probation_s, reason=p.phase not in FAILED))
                self._shown[p.device_id] = (p.phase, p.online, p.reason, now)

    def close(self) -> None:
        """Nothing to clean up."""


class JsonLines:
    """Every change as one JSON object on stdout (`--json`); the summary document follows as the last line."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.write = write or _stdout_line

    def show(self, changes: list[DeviceProgress]) -> None:
        """One line per change."""
        for p in changes:
            self.write(json.dumps(p.to_event(), sort_keys=True))

    def close(self) -> None:
        """Nothing to clean up."""


def _stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class LiveTable:
    """A table on a terminal, redrawn in place: per-phase counts, then one row per device (the failed and
    the most recently changed ones when there are more than fit)."""

    def __init__(self, tracker: RolloutProgress, console: Console, *, title: str = "",
                 max_rows: int = MAX_ROWS) -> None:
        self.tracker = tracker
        self.console = console
        self.title = title
        self.max_rows = max(3, min(max_rows, console.size.height - 6))
        self._drawn = 0.0
        # stdout written meanwhile (verdict lines) goes above the table only when it is this terminal too
        self.live = Live(self.render(), console=console, auto_refresh=False, transient=True,
                         redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
        self.live.start()

    def show(self, changes: list[DeviceProgress]) -> None:
        """Redraw, at most every LIVE_INTERVAL_S unless something changed phase."""
        now = time.monotonic()
        if now - self._drawn < LIVE_INTERVAL_S and not changes:
            return
        self._drawn = now
        self.live.update(self.render(), refresh=True)

    def close(self) -> None:
        """Take the table away; the verdict lines stay."""
        self.live.stop()

    def rows(self) -> tuple[list[DeviceProgress], int]:
        """The devices to list and how many are left out."""
        devices = list(self.tracker.devices.values())
        if len(devices) <= self.max_rows:
            return sorted(devices, key=lambda p: p.device_id), 0
        failed = sorted((p for p in devices if p.phase in FAILED), key=lambda p: -p.changed)
        busy = sorted((p for p in devices if p.phase not in FAILED and p.phase not in ENDED and p.phase != WAITING),
                      key=lambda p: -p.changed)
        rest = sorted((p for p in devices if p.phase in ENDED - FAILED or p.phase == WAITING), key=lambda p: -p.changed)
        shown = (failed + busy + rest)[:self.max_rows]
        return shown, len(devices) - len(shown)

    def render(self) -> RenderableType:
        """The counts line and the device table."""
        now = self.tracker.clock()
        counts = self.tracker.counts()
        summary = ", ".join(f"{counts[phase]} {phase}" for phase in ORDER if counts[phase])
        head = Text(f"{self.title}{len(self.tracker.devices)} device(s): {summary}", overflow="ellipsis", no_wrap=True)
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
        table.add_column("DEVICE", no_wrap=True, overflow="ellipsis", max_width=24)
        # fixed widths: the table does not jump about as devices move from phase to phase
        table.add_column("PHASE", no_wrap=True, min_width=len(Phase.ROLLED_BACK.value))
        table.add_column("PROGRESS", no_wrap=True, min_width=20)
        table.add_column("", no_wrap=True, min_width=len("100% (999.9/999.9 MiB)"))
        table.add_column("NOTE", overflow="ellipsis", no_wrap=True)
        shown, hidden = self.rows()
        for p in shown:
            style = "red" if p.phase in FAILED else ("green" if p.phase == Phase.COMMITTED.value else "")
            bar: RenderableType = ""
            amount = ""
            if p.phase == Phase.DOWNLOADING.value and p.percent is not None and p.total:
                bar = ProgressBar(total=p.total, completed=p.bytes or 0, width=20)
                amount = download_text(p)
            elif p.phase == Phase.SHADOW.value and p.shadow:
                amount = p.shadow
            table.add_row(p.device_id, Text(p.phase, style=style), bar, amount, self.note(p, now))
        parts: list[RenderableType] = [head, table]
        if hidden:
            parts.append(Text(f"... {hidden} more device(s), counted above", style="dim"))
        return Group(*parts)

    def note(self, p: DeviceProgress, now: float) -> str:
        """What else there is to know: offline, the reason of a failure, probation time."""
        notes = [] if p.online else ["offline"]
        if p.reason is not None:
            notes.append(p.reason)
        if p.phase == Phase.PROBATION.value:
            spent = f"probation {now - p.since:.0f} s"
            left = self.tracker.probation_left(p, now)
            notes.append(f"{spent}, at least {left:.0f} s left" if left is not None and left >= 0.5 else spent)
        return "; ".join(notes)


class ProgressFeed:
    """A tracker and the view it feeds, for the time a rollout is followed (a context manager: closing it
    takes a live table away)."""

    def __init__(self, tracker: RolloutProgress, view: ProgressView) -> None:
        self.tracker = tracker
        self.view = view
        self.closed = False

    def tick(self) -> None:
        """Show what changed since the last tick."""
        if not self.closed:
            self.view.show(self.tracker.poll())

    def close(self) -> None:
        """Show the last changes and end the view (once: a summary printed afterwards stays the last line)."""
        try:
            self.tick()
        finally:
            self.closed = True
            self.view.close()

    def __enter__(self) -> ProgressFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.closed = True
            self.view.close()
