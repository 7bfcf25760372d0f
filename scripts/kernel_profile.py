#!/usr/bin/env python3
"""Where one training step's GPU time goes, kernel by kernel, from Nsight Compute's raw CSV.

Usage: ncu --metrics gpu__time_duration.sum --clock-control none --cache-control none \
           --csv --page raw --log-file step.csv news2stock-dev ... bench-train --steps 1 --warmup 1
       scripts/kernel_profile.py step.csv [TOP]

A step is cut at the optimizer's first kernel (the global norm's sum of squares): the last
complete stretch from one optimizer step to the next holds one optimizer step and one forward +
backward. Kernels are grouped by name (template arguments dropped), largest total first.
"""
import csv
import re
import sys
from collections import defaultdict


def rows(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    reader = csv.DictReader(lines)
    scale = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}
    unit_ns = 1.0
    out = []
    for r in reader:
        t = r.get("gpu__time_duration.sum", "")
        if t in scale:  # the units row
            unit_ns = scale[t]
            continue
        try:
            out.append((r["Kernel Name"], float(t.replace(",", "")) * unit_ns))
        except ValueError:
            continue
    return out


def short(name):
    name = re.sub(r"<.*", "", name)
    return name[:90]


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    ks = rows(path)
    starts = [i for i, (n, _) in enumerate(ks)
              if "sum_squares" in n and (i == 0 or "sum_squares" not in ks[i - 1][0])]
    if len(starts) >= 2:
        seg = ks[starts[-2]:starts[-1]]
        print(f"kernels: {len(ks)}; optimizer steps seen: {len(starts)}; one step: {len(seg)} launches")
    else:
        seg = ks
        print(f"kernels: {len(ks)}; no two optimizer steps found: the whole run")
    total = defaultdict(float)
    count = defaultdict(int)
    for n, t in seg:
        total[short(n)] += t
        count[short(n)] += 1
    all_ns = sum(total.values())
    print(f"GPU time in the step: {all_ns / 1e6:.2f} ms (kernels back to back, no gaps)")
    print(f"{'ms':>9} {'share':>6} {'launches':>8} {'us/launch':>9}  kernel")
    for n, t in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{t / 1e6:9.2f} {100 * t / all_ns:5.1f}% {count[n]:8d} {t / 1e3 / count[n]:9.1f}  {n}")


if __name__ == "__main__":
    main()
