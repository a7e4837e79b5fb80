"""Compare `python -m deep_gemm bench --json` results of two builds, measured on one machine.

    python scripts/compare_bench.py base1.json,base2.json new1.json,new2.json [--tolerance 0.02]

Each side may list several runs (comma-separated): a row's time is its fastest run, which damps
the run-to-run noise of a shared machine. Prints, per row, our kernel's time on each side, the
ratio base / new (> 1: new is faster) and the host overhead, then the geometric mean; exits 1 if a
row is slower than base by more than the tolerance, or wrong on either side.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def load(paths: str) -> dict:
    """{(suite, label): {"us", "host_us", "status"}} over the runs in `paths`, fastest run per row."""
    rows = {}
    for path in paths.split(","):
        with open(path) as f:
            data = json.load(f)
        for row in data.get("rows", []):
            ours = row["peers"].get("ours", {})
            key = (row["suite"], row["label"])
            best = rows.get(key)
            if ours.get("status") != "ok":
                rows[key] = {"us": None, "host_us": None, "status": ours.get("status", "n/a")}
            elif best is None or (best["us"] is not None and ours["us"] < best["us"]):
                rows[key] = {"us": ours["us"], "host_us": ours.get("host_us"), "status": "ok"}
        for row in data.get("casts", []):
            key = ("casts", row["name"])
            best = rows.get(key)
            status = "ok" if row.get("bit_identical") else "WRONG"
            if best is None or (status == "ok" and best["us"] is not None and row["us"] < best["us"]):
                rows[key] = {"us": row["us"] if status == "ok" else None, "host_us": row.get("host_us"),
                             "status": status}
    return rows


def compare(base: dict, new: dict, tolerance: float) -> tuple:
    """(printable lines, failures, geometric mean of base / new)."""
    lines = [f"{'suite':<11} {'row':<32} {'base us':>9} {'new us':>9} {'base/new':>9} {'host base':>10} {'host new':>9}"]
    failures, logs = [], []
    for key in base.keys() | new.keys():
        b, n = base.get(key), new.get(key)
        if b is None or n is None or b["us"] is None or n["us"] is None:
            status = (b or {}).get("status"), (n or {}).get("status")
            lines.append(f"{key[0]:<11} {key[1]:<32} missing or not ok: base {status[0]}, new {status[1]}")
            if "WRONG" in status or "error" in status:
                failures.append(key)
            continue
        ratio = b["us"] / n["us"]
        logs.append(math.log(ratio))
        flag = "  SLOWER" if ratio < 1 - tolerance else ""
        if flag:
            failures.append(key)
        host = [f"{v:.1f}" if v is not None else "n/a" for v in (b["host_us"], n["host_us"])]
        lines.append(f"{key[0]:<11} {key[1]:<32} {b['us']:9.1f} {n['us']:9.1f} {ratio:9.3f} {host[0]:>10} "
                     f"{host[1]:>9}{flag}")
    lines[1:] = sorted(lines[1:])
    geomean = math.exp(sum(logs) / len(logs)) if logs else float("nan")
    return lines, failures, geomean


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="bench JSON of the base build (comma-separated runs)")
    p.add_argument("new", help="bench JSON of the new build (comma-separated runs)")
    p.add_argument("--tolerance", type=float, default=0.02, help="slowdown allowed per row (default 0.02)")
    args = p.parse_args(argv)
    lines, failures, geomean = compare(load(args.base), load(args.new), args.tolerance)
    print("\n".join(lines))
    print(f"geomean base/new {geomean:.3f}; {len(failures)} row(s) slower than {args.tolerance:.0%} or wrong")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
