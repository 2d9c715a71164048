"""A short reading of one Nsight Compute report exported as CSV (the `ncu_*.sh` scripts write both pages).

    python3 benchmarks/ncu_summary.py details_X.csv sass_X.csv [--top 30]

Prints the details page's speed-of-light, occupancy, launch and warp-state metrics, then the SASS page's stall
samples: their total by reason over the kernel, and the instructions that collect the most, each with its three
largest reasons.
"""

from __future__ import annotations

import argparse
import csv
import re

SECTIONS = ("GPU Speed Of Light Throughput", "Memory Workload Analysis", "Launch Statistics", "Occupancy",
            "Scheduler Statistics", "Warp State Statistics", "Compute Workload Analysis")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _rows(path: str, first: str = '"') -> list[dict]:
    """The CSV from its header line on: the first line that starts with `first` (ncu's own log lines, and on the
    source page a "Kernel Name" line, come before it)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(first)), 0)
    return list(csv.DictReader(lines[start:]))


def details(path: str) -> None:
    seen = set()
    for r in _rows(path):
        section, name = r.get("Section Name", ""), r.get("Metric Name", "")
        if section in SECTIONS and name and (section, name) not in seen:
            seen.add((section, name))
            print(f"  {section[:24]:24} {name[:44]:44} {r.get('Metric Value', ''):>14} {r.get('Metric Unit', '')}")


def sass(path: str, top: int) -> None:
    rows = _rows(path, '"Address"')
    if not rows:
        print("  (no SASS rows)")
        return
    cols = list(rows[0])
    total_col = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    reasons = [c for c in cols if c != total_col and re.search(r"stall", c, re.I) and "Not Issued" not in c
               and "Warp Stall Sampling" not in c]
    if total_col is None:
        print("  no stall-sampling column; columns:", ", ".join(cols))
        return
    total = sum(_number(r[total_col]) for r in rows) or 1.0
    sums = sorted(((sum(_number(r[c]) for r in rows), c) for c in reasons), reverse=True)
    print(f"  {int(total)} stall samples over {len(rows)} instructions; by reason:")
    for value, c in sums[:12]:
        if value:
            print(f"    {100 * value / total:5.1f} %  {c}")
    print(f"  the {top} instructions with the most samples:")
    executed = next((c for c in cols if c.startswith("Instructions Executed")), None)
    for r in sorted(rows, key=lambda r: -_number(r[total_col]))[:top]:
        why = sorted(((_number(r[c]), c) for c in reasons), reverse=True)[:3]
        why = ", ".join(f"{c.replace('stall_', '')} {int(v)}" for v, c in why if v)
        ex = f" ×{r[executed]}" if executed else ""
        share = 100 * _number(r[total_col]) / total
        print(f"    {share:5.1f} %  {r.get('Address', ''):>6}  {r.get('Source', '')[:60]:60}{ex}  ({why})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("details")
    p.add_argument("sass")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    print(f"details: {args.details}")
    details(args.details)
    print(f"sass: {args.sass}")
    sass(args.sass, args.top)


if __name__ == "__main__":
    main()
