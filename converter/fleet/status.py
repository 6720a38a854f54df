"""`edgectl fleet status`: one row per device from the retained status and state, groups from the inventory.

A device's status may claim any group; with a verified inventory (converter/fleet/inventory.py) the
table lists the inventory's members, seen or not, and marks the groups a device only claims.
"""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

from edgefleet.converter.fleet.inventory import Verified
from edgefleet.converter.fleet.observer import DeviceView

COLUMNS = ("device", "online", "groups", "models", "last outcome", "status age")


def models_cell(view: DeviceView) -> str:
    """Each model of the device: version, phase, and the version it is moving to."""
    if view.state is None:
        return "-"
    parts = []
    for name, m in sorted(view.state.models.items()):
        version = f" v{m.active.version}" if m.active else ""
        pending = f" (-> v{m.pending.version})" if m.pending else ""
        parts.append(f"{name}{version} {m.phase}{pending}")
    return "\n".join(parts) or "-"


def outcome_cell(view: DeviceView) -> str:
    """Each model's last outcome, with its reason."""
    if view.state is None:
        return "-"
    parts = []
    for name, m in sorted(view.state.models.items()):
        o = m.last_outcome
        if o is not None:
            reason = f": {o.reason}" if o.reason else ""
            parts.append(f"{name} v{o.version} {o.result}{reason}")
    return "\n".join(parts) or "-"


NOT_IN_INVENTORY = "claims group, not in inventory"


def groups_cell(view: DeviceView, inventory: Verified | None) -> str:
    """The device's groups: the inventory's, then groups it only claims, marked; its claims without an inventory."""
    if inventory is None:
        return ", ".join(view.groups) or "-"
    listed = inventory.groups_of(view.device_id)
    claimed = [f"{g} ({NOT_IN_INVENTORY})" for g in view.groups if g not in listed]
    return ", ".join([*listed, *claimed]) or "-"


def with_inventory(views: dict[str, DeviceView], inventory: Verified | None, group: str | None) -> dict[str, DeviceView]:
    """The devices to show: the inventory's members (seen or not) and every device seen, of `group` if given."""
    out = dict(views)
    if inventory is not None:
        for members in inventory.inventory.groups.values():
            for d in members:
                out.setdefault(d, DeviceView(device_id=d))
    if group is None:
        return out
    listed = set(inventory.inventory.members(group)) if inventory is not None else set()
    return {d: v for d, v in out.items() if d in listed or group in v.groups}


def status_json(views: dict[str, DeviceView], inventory: Verified | None) -> dict[str, Any]:
    """`fleet status --json`: every device's view, with its inventory groups when there is an inventory."""
    devices = []
    for d in sorted(views):
        row = views[d].to_dict()
        if inventory is not None:
            listed = inventory.groups_of(d)
            row["inventory_groups"] = list(listed)
            row["claims_not_in_inventory"] = [g for g in views[d].groups if g not in listed]
        devices.append(row)
    return {"devices": devices, "inventory": None if inventory is None else {
        "version": inventory.inventory.version, "key_id": inventory.key_id,
        "expires_at": inventory.inventory.expires_at}}


def status_table(views: dict[str, DeviceView], inventory: Verified | None, now: float | None = None) -> Table:
    """The table of `fleet status`, one row per device."""
    now = time.time() if now is None else now
    table = Table(show_lines=False)
    for col in COLUMNS:
        table.add_column(col)
    for d in sorted(views):
        v = views[d]
        age = f"{now - v.status.ts:.0f} s" if v.status is not None and v.status.ts else "-"
        presence = "yes" if v.online else ("never seen" if v.status is None else "no")
        table.add_row(d, presence, groups_cell(v, inventory), models_cell(v), outcome_cell(v), age)
    return table


def status_summary(views: dict[str, DeviceView], inventory: Verified | None) -> str:
    """The line under the table: how many devices, how many online, where the groups come from."""
    online = sum(1 for v in views.values() if v.online)
    source = f"groups from inventory version {inventory.inventory.version}" if inventory is not None else \
        "groups as the devices claim them (no verified inventory)"
    return f"{len(views)} device(s), {online} online; {source}"
