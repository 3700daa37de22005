"""SoftCAM's claim, read off the comparison's rows: does a self-explaining (SoftCAM) row beat every
row of the post-hoc CAM family on activation precision, PxAP and deletion AUDC? Each answer is
computed from the rows it quotes, with the ideal map's ceiling at both rows' map resolutions, so the
sentence changes when the figures do (``claims.md`` beside the table)."""

from __future__ import annotations

import math
from pathlib import Path

# (column, title, higher is better): the SoftCAM paper's localisation and faithfulness claims
CLAIM_COLUMNS = (("activation_precision", "activation precision", True), ("pxap", "PxAP", True),
                 ("deletion_audc", "deletion AUDC", False))


def _ceiling(rows: list[dict], key: str, shape: str) -> float:
    ideal = [r[key] for r in rows if r.get("kind") == "ideal" and r.get("raw_map_shape") == shape and key in r]
    return ideal[0] if ideal else math.nan


def verdicts(rows: list[dict]) -> list[dict]:
    """For each self-explaining row and claim column: ``beats`` (True / False; None where a value is
    missing), the row's value, the best CAM-family row and its value, and the ideal map's value at
    each one's map resolution (localisation columns only)."""
    methods = [r for r in rows if r.get("kind", "method") == "method"]
    cams = [r for r in methods if r.get("family") == "cam"]
    out = []
    for row in (r for r in methods if r.get("family") == "self-explaining"):
        for key, title, up in CLAIM_COLUMNS:
            rivals = [r for r in cams if not math.isnan(r.get(key, math.nan))]
            value = row.get(key, math.nan)
            if not rivals or math.isnan(value):
                out.append({"method": row["method"], "column": title, "beats": None})
                continue
            best = (max if up else min)(rivals, key=lambda r: r[key])
            out.append({"method": row["method"], "column": title, "key": key, "value": value,
                        "beats": value > best[key] if up else value < best[key], "rival": best["method"],
                        "rival_value": best[key], "ceiling": _ceiling(rows, key, row.get("raw_map_shape")),
                        "rival_ceiling": _ceiling(rows, key, best.get("raw_map_shape")),
                        "shape": row.get("raw_map_shape"), "rival_shape": best.get("raw_map_shape")})
    return out


def _sentence(v: dict) -> str:
    answer = "**yes**" if v["beats"] else "**no**"
    text = (f"- {v['method']}, {v['column']}: {answer}, {v['value']:.3f} against {v['rival_value']:.3f} for the best "
            f"CAM-family row ({v['rival']}; difference {v['value'] - v['rival_value']:+.4f})")
    if not math.isnan(v["ceiling"]):
        text += f"; ideal map {v['ceiling']:.3f} at {v['shape']}"
        if v["rival_shape"] != v["shape"] and not math.isnan(v["rival_ceiling"]):
            text += f", {v['rival_ceiling']:.3f} at the CAM row's {v['rival_shape']}"
    return text + "."


def write_claims(path: Path, rows: list[dict]) -> Path:
    """``verdicts`` as Markdown: one line per SoftCAM row and column with an answer, and a count of yes
    answers per row; one line saying so where nothing can be answered (no SoftCAM or no CAM-family row)."""
    found = [v for v in verdicts(rows) if v["beats"] is not None]
    lines = ["Does a SoftCAM row beat every post-hoc CAM-family row? (computed from comparison.csv)", ""]
    lines += [_sentence(v) for v in found] or ["- not measured: no SoftCAM row, or no CAM-family row, with these columns."]
    for method in dict.fromkeys(v["method"] for v in found):
        answered = [v for v in found if v["method"] == method]
        lines.append(f"\n{method}: yes on {sum(v['beats'] for v in answered)} of {len(answered)} columns.")
    path.write_text("\n".join(lines) + "\n")
    return path
