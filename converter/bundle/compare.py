"""What `edgectl diff` shows: two descriptions (converter/bundle/describe.py) side by side, field by
field, with what a device holding the first bundle still has to download for the second."""

from __future__ import annotations

from typing import Any


def _interval(metrics: dict[str, Any]) -> str | None:
    low, high = metrics.get("accuracy_drop_low_pt"), metrics.get("accuracy_drop_high_pt")
    return None if low is None or high is None else f"{low:.2f} to {high:.2f} points"


def _discordant(metrics: dict[str, Any]) -> str | None:
    b, c = metrics.get("float_only_correct"), metrics.get("converted_only_correct")
    return None if b is None or c is None else f"{int(b)} / {int(c)}"


def _gate(side: dict[str, Any]) -> str | None:
    """The gate's decision and deciding figure, from the report (or the manifest's metrics)."""
    gate = (side.get("report") or {}).get("gate") or {}
    metrics = (side.get("manifest") or {}).get("metrics", {})
    decision = gate.get("decision") or metrics.get("gate_decision")
    if decision is None or gate.get("metric") == "none":
        return None
    value, limit = gate.get("value"), gate.get("limit")
    shown = f" {gate['metric']} {value:.2f}, limit {limit:g}" if value is not None and limit is not None else ""
    return f"{decision}:{shown}" if shown else str(decision)


def _outputs(side: dict[str, Any]) -> dict[str, str]:
    """Each output's agreement with its float model, one short line per output name, from the report."""
    from edgefleet.converter.convert.report import agreement_line

    outputs = ((side.get("report") or {}).get("validation") or {}).get("outputs") or []
    return {str(o["name"]): agreement_line(o) for o in outputs}


def _tensor(t: dict[str, Any] | None) -> str | None:
    if t is None:
        return None
    q = t.get("quantization")
    quant = f" q=({q['scale']:.6g},{q['zero_point']})" if q else ""
    return f"{t['dtype']}{t['shape']}{quant}"


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows of (field, A, B, changed), operators and signature side by side, and the update's download cost."""
    ma, mb = a["model"], b["model"]
    fa = (a.get("manifest") or {}).get("metrics", {})
    fb = (b.get("manifest") or {}).get("metrics", {})
    rows: list[dict[str, Any]] = []

    def row(field: str, va: Any, vb: Any) -> None:
        rows.append({"field": field, "a": va, "b": vb, "changed": va != vb})

    mfa, mfb = a.get("manifest") or {}, b.get("manifest") or {}
    row("name", mfa.get("name"), mfb.get("name"))
    row("version", mfa.get("version"), mfb.get("version"))
    row("bytes on disk", ma["bytes"], mb["bytes"])
    row("bytes on the wire", ma["wire_bytes"], mb["wire_bytes"])
    row("parameters", ma.get("params"), mb.get("params"))
    row("MACs per invoke", ma.get("macs"), mb.get("macs"))
    if "host_latency" in a or "host_latency" in b:
        row("bare p50 ms here", _p50(a.get("host_latency")), _p50(b.get("host_latency")))
    row("quantization", ma["quantization"], mb["quantization"])
    row("sparsity", ma["sparsity"], mb["sparsity"])
    row("sparse encoding", ma["sparse_encoding"], mb["sparse_encoding"])
    for key in ("accuracy", "accuracy_drop_pt"):
        row(key.replace("_", " "), fa.get(key), fb.get(key))
    row("accuracy drop 95 % CI", _interval(fa), _interval(fb))
    row("gate", _gate(a), _gate(b))
    row("gate method", ((a.get("report") or {}).get("gate") or {}).get("method"),
        ((b.get("report") or {}).get("gate") or {}).get("method"))
    row("right only in float / only converted", _discordant(fa), _discordant(fb))
    row("evaluation samples", fa.get("validation_samples"), fb.get("validation_samples"))
    row("evaluation held out", fa.get("eval_held_out"), fb.get("eval_held_out"))
    for key in ("top1_agreement", "sqnr_db", "cosine_min", "latency_p50_ms", "latency_p95_ms"):
        row(key.replace("_", " "), fa.get(key), fb.get(key))
    oa, ob = _outputs(a), _outputs(b)
    if len(oa) > 1 or len(ob) > 1:
        for name in dict.fromkeys([*oa, *ob]):
            row(f"agreement {name}", oa.get(name), ob.get(name))
    row("signed by", (a.get("signature") or {}).get("key_id"), (b.get("signature") or {}).get("key_id"))
    pa, pb = mfa.get("preprocessing") or {}, mfb.get("preprocessing") or {}
    row("input mean", pa.get("mean"), pb.get("mean"))
    row("input std", pa.get("std"), pb.get("std"))
    la, lb = (mfa.get("postprocessing") or {}), (mfb.get("postprocessing") or {})
    row("labels", la.get("labels"), lb.get("labels"))
    row("top k", la.get("top_k"), lb.get("top_k"))

    ops_a = {o["name"]: o["version"] for o in ma["operators"]}
    ops_b = {o["name"]: o["version"] for o in mb["operators"]}
    operators = [{"name": n, "a": ops_a.get(n), "b": ops_b.get(n), "changed": ops_a.get(n) != ops_b.get(n)}
                 for n in sorted(set(ops_a) | set(ops_b))]
    signature = []
    for kind in ("inputs", "outputs"):
        ta, tb = ma[kind], mb[kind]
        for i in range(max(len(ta), len(tb))):
            va = _tensor(ta[i] if i < len(ta) else None)
            vb = _tensor(tb[i] if i < len(tb) else None)
            signature.append({"tensor": f"{kind[:-1]} {i}", "a": va, "b": vb, "changed": va != vb})
    return {"a": a["path"], "b": b["path"], "rows": rows, "operators": operators, "signature": signature,
            "signature_changed": any(s["changed"] for s in signature), "update": _update_cost(a, b)}


def _p50(lat: dict[str, Any] | None) -> float | str | None:
    if not lat:
        return None
    return lat.get("p50_ms") if "error" not in lat else f"not measured: {lat['error']}"


def _update_cost(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    if a["kind"] != "bundle" or b["kind"] != "bundle":
        return None
    from edgefleet.bundle import Bundle

    model_a = Bundle.load(a["path"]).deployment.model
    art_b = Bundle.load(b["path"]).deployment.model.artifact
    # A device holding A has its model and golden chunks; content addressing makes those free.
    held = {c.sha256 for c in model_a.artifact.chunks} | {c.sha256 for c in model_a.golden.chunks}
    new = [c for c in art_b.chunks if c.sha256 not in held]
    return {"chunks": len(art_b.chunks), "new_chunks": len(new), "new_wire_bytes": sum(c.wire_size for c in new),
            "wire_bytes": art_b.wire_size}
