"""A store's summary, for people (``satdata info``) and for scripts (``--json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from satdata.remote import is_url, redact
from satdata.store import Store, store_digest


def _du(path: str) -> int | None:
    if is_url(path):  # a server's objects: not summed over the network
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def describe(store: Store) -> dict[str, Any]:
    """The machine-readable summary printed by ``satdata info --json``."""
    info = store.info
    splits = {s: {"count": n, "maps": sorted(info.maps)} for s, n in info.splits.items()}
    return {
        "path": redact(store.path),  # never a password written into a URL
        "format_version": info.format_version,
        "dataset": info.dataset,
        "classes": info.classes,
        "num_classes": len(info.classes),
        "image_size": list(info.image_size),
        "label_kind": info.label_kind,
        "hflip": info.hflip,
        "splits": splits,
        "maps": {
            m.name: {"kind": m.kind, "encoding": m.encoding, "channels": m.channels,
                     "targets": m.targets, "provenance": m.provenance}
            for m in info.maps.values()
        },
        "boxes": [s for s in info.splits if store.has_boxes(s)],
        "digest": store_digest(info),
        "bytes": _du(store.path),
        "provenance": info.provenance,
    }


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


def format_info(d: dict[str, Any]) -> str:
    """The human-readable summary printed by ``satdata info``."""
    h, w = d["image_size"]
    lines = [
        f"{d['path']}  (satkit store, format v{d['format_version']}, "
        f"{'on a server' if d['bytes'] is None and is_url(d['path']) else _human(d['bytes'])})",
        f"  dataset     {d['dataset']}",
        f"  images      {h}x{w} RGB uint8",
        f"  labels      {d['label_kind']}-label, {d['num_classes']} classes: "
        + ", ".join(d["classes"][:12]) + (" ..." if d["num_classes"] > 12 else ""),
        "  splits      " + ", ".join(f"{s} {v['count']:,}" for s, v in d["splits"].items()),
        "  hflip       " + ("yes (a horizontal flip keeps the class)" if d.get("hflip", True)
                            else "no (a horizontal flip can change the class, so augmentation should not flip)"),
    ]
    if d["maps"]:
        lines.append("  maps")
        for name, m in d["maps"].items():
            lines.append(f"    {name:<14} {m['kind']:<12} {m['encoding']:<7} channels={m['channels']}"
                         + ("  (+ target class per sample)" if m.get("targets") else ""))
    else:
        lines.append("  maps        none (add one with `satdata saliency`)")
    if d["boxes"]:
        lines.append("  boxes       " + ", ".join(d["boxes"]))
    p = d["provenance"]
    if p:
        src = p.get("source", "?")
        root = p.get("root")
        lines.append(f"  built from  {src}" + (f" at {root}" if root else ""))
        extra = {k: p[k] for k in ("fit", "options") if p.get(k)}
        if extra:
            lines.append("  options     " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        if p.get("skipped_count"):
            lines.append(f"  skipped     {p['skipped_count']} bad samples (see --json provenance.skipped)")
        lines.append(f"  created     {p.get('created', '?')} by {p.get('tool', '?')}")
    lines.append(f"  digest      {d['digest'][:16]}")
    return "\n".join(lines)
