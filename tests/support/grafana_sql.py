"""The SQL of deploy/grafana/edgefleet-history.json with Grafana's macros and variables replaced, as Grafana
would send it to PostgreSQL."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "edgefleet-history.json"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, SQL) for every panel target, template variable and annotation."""
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            out.append((f"panel {panel['title']!r}", target["rawSql"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["query"]))
    for anno in dash["annotations"]["list"]:
        out.append((f"annotation {anno['name']!r}", anno["target"]["rawSql"]))
    return out


def expand(sql: str, *, since: float, until: float, devices: list[str], models: list[str], group: str) -> str:
    """Replace $__unixEpochFilter(col), $device, $model and ${group:raw} as Grafana does."""
    def quoted(values: list[str]) -> str:
        return ", ".join("'" + v.replace("'", "''") + "'" for v in values)

    sql = re.sub(r"\$__unixEpochFilter\((\w+)\)", lambda m: f"{m.group(1)} BETWEEN {since} AND {until}", sql)
    sql = sql.replace("${group:raw}", group).replace("$device", quoted(devices)).replace("$model", quoted(models))
    assert "$" not in sql, f"a macro or variable left: {sql}"
    return sql
