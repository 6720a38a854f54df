"""The fleet watch table laid out to a width (columns by priority, numbers never cut), its header line,
and the keys of the live view."""

from __future__ import annotations

import re

import pytest

from edgefleet.converter.fleet.watch import (
    ModelCell,
    Row,
    WatchState,
    decode_keys,
    header_line,
    layout,
    plain_text,
    public_url,
    table_lines,
)

NUMERIC = ("p50", "p95", "cpu", "rss", "temp")
FIGURES = {"p50": {0.75, 12.25}, "p95": {1.5, 30.5}, "cpu": {12.5, 80.0}, "rss": {41.9, 20.0}, "temp": {55.5}}


def fleet() -> list[Row]:
    return [
        Row("cam-north-0001", True, ("lab", "north"),
            (ModelCell("det", 3, "COMMITTED", 0.75, 1.5), ModelCell("classifier", 12, "PROBATION", 12.25, 30.5)),
            12.5, 41.9, 55.5, "det v3 ROLLED_BACK: p95 latency 12.345 ms is 8.20x the previous", 1.0, 3.0),
        Row("cam-b", False, ("lab",), (ModelCell("det", 2, "ROLLED_BACK"),), None, None, None, "", 0.0, None),
        Row("cam-c", True, (), (), 80.0, 20.0, None, "", 0.0, 1.0),
    ]


@pytest.mark.parametrize("width", [200, 160, 120, 100, 90, 80])
def test_every_width_keeps_the_four_and_whole_numbers(width: int) -> None:
    lines = table_lines(fleet(), width)
    assert all(len(line.text) <= width for line in lines)
    for line in lines[1:]:
        cells = {key: line.text[start:end].strip() for key, (start, end) in line.spans.items()}
        assert {"device", "model", "version", "phase"} <= set(cells)
        model = line.model
        if model is not None:
            assert (cells["model"], cells["version"], cells["phase"]) == (model.name, f"v{model.version}", model.phase)
        for key in NUMERIC:
            if cells.get(key):  # shown: a whole figure, rounded, never a cut one
                assert any(abs(float(cells[key]) - v) <= 0.5 for v in FIGURES[key]), (key, cells[key])


def test_wider_shows_more_and_abbreviates_before_dropping() -> None:
    keys = {w: [p.column.key for p in layout(fleet(), w)[0]] for w in (80, 100, 120, None)}
    assert set(keys[80]) < set(keys[100]) < set(keys[120]) <= set(keys[None])
    assert keys[80][:1] == ["device"] and {"online", "p95", "cpu", "last-event"} <= set(keys[80])
    headers = {p.column.key: p.variant.header for p in layout(fleet(), 80)[0]}
    assert headers["online"] == "on"  # abbreviated, not dropped
    assert [p.variant.header for p in layout(fleet(), None)[0]] == [
        "device", "online", "groups", "model", "ver", "phase", "p50 ms", "p95 ms", "drift", "cpu %", "rss MB",
        "temp °C", "last event", "seen"]


@pytest.mark.parametrize("width", [40, 30, 20])
def test_narrow_terminals_cut_text_with_an_ellipsis(width: int) -> None:
    lines = table_lines(fleet(), width)
    assert all(len(line.text) <= width for line in lines)
    assert [p.column.key for p in layout(fleet(), width)[0]] == ["device", "model", "version", "phase"]
    first = lines[1].text.split()
    assert first[0].startswith("cam") and first[2] == "v3"  # the version is never cut
    assert "…" in lines[1].text


def test_plain_text_repeats_the_device_and_header_fits() -> None:
    text = plain_text(fleet(), 80, broker="mqtt://broker.example:1883", group="lab", text="cam", sort="cpu")
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0] == "mqtt://broker.example:1883 · group lab · filter 'cam' · 3 devices, 2 online"  # no room for more
    assert [line.split()[0] for line in lines[2:]] == ["cam-north-0001", "cam-north-0001", "cam-b", "cam-c"]
    full = header_line(fleet(), broker="mqtt://h", group=None, text=None, sort="p95", width=None, clock=lambda: 0)
    assert re.fullmatch(r"mqtt://h · all groups · 3 devices, 2 online · 1 ROLLED_BACK, 1 PROBATION, 1 COMMITTED · "
                        r"sort p95 · \d\d:\d\d:\d\d", full), full
    narrow = header_line(fleet(), broker="mqtt://broker.example:1883", group=None, text=None, sort="cpu", width=80)
    assert narrow == "mqtt://broker.example:1883 · 3 devices, 2 online · 1 ROLLED_BACK, 1 PROBATION, …"
    assert header_line(fleet(), broker="mqtt://a-very-long-broker-name.example.com:8883", group=None, text=None,
                       sort="device", width=30, clock=lambda: 0) == "mqtt://a-very-long-broker-nam…"
    assert public_url("mqtts://user:secret@broker:8883") == "mqtts://broker:8883"


def test_keys() -> None:
    assert decode_keys(b"q") == ["q"]
    assert decode_keys(b"/ab\x7f\r") == ["/", "a", "b", "backspace", "enter"]
    assert decode_keys(b"\x1b[A\x1bOB\x1b[15~s\x1b") == ["s", "esc"]  # arrows and F5 dropped, a lone Esc kept
    state = WatchState()
    for key in ["/", "c", "a", "x", "backspace", "m", "enter"]:
        state.key(key)
    assert (state.text, state.editing) == ("cam", None)
    for key in ["/", "z", "esc"]:
        state.key(key)
    assert state.text == "cam"  # Esc while typing cancels the typing only
    assert "q quit" in state.footer() and "sorted by device" in state.footer()
    state.key("esc")
    assert state.text is None
    sorts = []
    for _ in range(5):
        state.key("s")
        sorts.append(state.sort)
    assert sorts == ["cpu", "rss", "p95", "last-event", "device"]
    groups = []
    for _ in range(3):
        state.key("g", ["north", "lab"])
        groups.append(state.group)
    assert groups == ["lab", "north", None]
    state.key("/")
    state.key("q")  # typed into the filter, not quitting
    assert not state.quit and state.editing == "q" and "Enter applies" in state.footer()
    state.key("esc")
    state.key("q")
    assert state.quit
