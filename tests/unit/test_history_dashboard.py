"""deploy/grafana/edgefleet-history.json is a dashboard for the PostgreSQL data source whose every query is
SQL against the history tables (tests/e2e/test_fleet_history.py runs them after a collection)."""

from __future__ import annotations

from tests.support.grafana_sql import dashboard, expand, queries


def test_the_history_dashboard_parses_and_every_query_names_the_history_tables() -> None:
    dash = dashboard()
    assert dash["uid"] == "edgefleet-history" and len({p["id"] for p in dash["panels"]}) == len(dash["panels"]) >= 7
    assert all(p["datasource"]["type"] == "grafana-postgresql-datasource" for p in dash["panels"])
    found = queries(dash)
    assert len(found) >= 11
    for where, sql in found:
        assert any(f" {t} " in f" {sql} " for t in ("telemetry", "deployments", "devices")), where
        expanded = expand(sql, since=0.0, until=1.0, devices=["cam-1"], models=["det"], group="lab")
        assert "BETWEEN 0.0 AND 1.0" in expanded or "$__" not in sql, where
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    assert all(w in titles for w in ("p95", "p50", "error rate", "cpu", "memory", "drift", "outcomes"))
