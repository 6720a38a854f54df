"""A push as an operator follows it: the chunks' progress bar, then each targeted device to its verdict.

`edgectl push --wait` and the rest of the group after `push --canary --wait` follow a rollout the same
way, with the same lines; `say` receives them (a no-op for --json, whose caller prints the summary).
Meanwhile a `ProgressFeed` (`rollout_progress`) shows each device's phase and download as it goes
(converter/fleet/progress.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.progress import (
    JsonLines,
    LiveTable,
    PlainLines,
    ProgressFeed,
    ProgressView,
    RolloutProgress,
)
from edgefleet.converter.fleet.publish import DeviceResult, Prepared, publish_chunks, wait_for_rollout
from edgefleet.converter.output import stderr_console
from edgefleet.protocol import Topics
from edgefleet.transport import Transport

VERDICTS = ("committed", "failed", "waiting", "pending")


def publish_with_progress(transport: Transport, topics: Topics, prepared: Prepared, *, quiet: bool = False) -> float:
    """publish_chunks with a progress bar on a terminal's stderr (none when `quiet`); the seconds it took."""
    err = stderr_console()
    with Progress(TextColumn("chunks"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True,
                  disable=quiet or not err.is_terminal) as bar:
        task = bar.add_task("publish", total=prepared.wire_bytes)
        return publish_chunks(transport, topics, prepared.chunks,
                              progress=lambda done: bar.update(task, completed=done))


def device_line(r: DeviceResult) -> str:
    """One device's verdict as the operator reads it."""
    if r.verdict == "failed":
        return f"device {r.device_id}: {r.detail}"
    if r.verdict == "committed":
        return f"device {r.device_id}: committed {r.detail} after {r.seconds or 0:.1f} s"
    return f"device {r.device_id}: {'pending' if r.verdict == 'pending' else 'unfinished'}: {r.detail}"


@dataclass(frozen=True)
class Followed:
    """Every targeted device's result once the rollout ended (all committed, one failed, or the timeout)."""

    results: dict[str, DeviceResult]

    @property
    def counts(self) -> dict[str, int]:
        return {v: sum(1 for r in self.results.values() if r.verdict == v) for v in VERDICTS}

    @property
    def ok(self) -> bool:
        """Some device was targeted, none failed and none is unfinished (pending devices catch up later)."""
        return bool(self.results) and self.counts["failed"] == 0 and self.counts["waiting"] == 0

    def summary_line(self) -> str:
        c = self.counts
        return f"{c['committed']} committed, {c['failed']} failed, {c['waiting']} unfinished, {c['pending']} pending"

    def devices(self) -> list[dict[str, Any]]:
        """The results as JSON-ready dicts."""
        return [dataclasses.asdict(r) for r in self.results.values()]


def nobody_to_follow(observer: FleetObserver, targets: dict[str, DeviceResult], group: str | None) -> str | None:
    """Why `push --wait` has nothing to follow (no targeted device ever reported a status on this broker),
    or None. A device that is offline now is known: it is pending and catches up later."""
    if any((view := observer.get(d)) is not None and view.status is not None for d in targets):
        return None
    who = f"none of the {len(targets)} member(s) of group {group}" if group else \
        f"none of the {len(targets)} targeted device(s)"
    return (f"push --wait: {who} ever reported a status on this broker, so there is nothing to wait for; nothing "
            "was published. If their agents run, the broker may not deliver retained messages to wildcard "
            "subscriptions (see 'edgectl broker check'); to publish for devices that have not connected yet, "
            "push without --wait")


def rollout_progress(observer: FleetObserver, devices: Iterable[str], prepared: Prepared, *, as_json: bool,
                     say: Callable[[str], None], after: ProgressFeed | None = None) -> ProgressFeed:
    """The progress of `devices` with this deployment, shown where it belongs: JSON Lines on stdout for
    --json, a live table on a terminal's stderr, else plain lines through `say`. After the canaries'
    feed (`after`), the group's goes on from where it stopped instead of repeating what it showed."""
    dep = prepared.deployment
    tracker = RolloutProgress(observer, devices, dep.model.name, dep.deployment_id, total_bytes=prepared.wire_bytes,
                              probation_s=dep.policy.probation_s,
                              after=after.tracker if after is not None else None)
    view: ProgressView
    if as_json:
        view = JsonLines()
    else:
        err = stderr_console()
        view = LiveTable(tracker, err, title=f"{dep.model.name} v{dep.model.version}: ") if err.is_terminal \
            else PlainLines(tracker, say)
    return ProgressFeed(tracker, view)


def follow(observer: FleetObserver, targets: dict[str, DeviceResult], name: str, dep_id: str, *, timeout: float,
           group: str | None = None, say: Callable[[str], None] = lambda line: None,
           progress: ProgressFeed | None = None) -> Followed:
    """Follow the online `targets` until each committed deployment `dep_id` of model `name`, one failed, or
    `timeout` s passed; the offline ones are reported as pending. `progress` is shown meanwhile, each
    device's last phase before its verdict line."""
    if not targets:
        say(f"no device of group {group} is targeted" if group else "no targeted device")
    for r in targets.values():
        if r.verdict == "pending":
            say(device_line(r))
    waiting = sum(1 for r in targets.values() if r.verdict == "waiting")
    if waiting:
        say(f"waiting for {waiting} online device(s), up to {timeout:g} s")
    tick = progress.tick if progress is not None else None

    def verdict(r: DeviceResult) -> None:
        if tick is not None:
            tick()
        say(device_line(r))

    results = wait_for_rollout(observer, targets, name, dep_id, timeout, on_result=verdict, on_tick=tick)
    if tick is not None:
        tick()
    for r in results.values():
        if r.verdict == "waiting":
            say(device_line(r))
    return Followed(results)
