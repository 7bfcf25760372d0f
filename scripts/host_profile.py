#!/usr/bin/env python3
"""Where the host's CPU time goes, from `PEFT_HOST_PROFILE=FILE news2stock-dev ...` (folded stacks).

Usage: scripts/host_profile.py FILE [TOP] [MATCH]

Prints the samples per thread, then the TOP (default 40) functions by inclusive samples (a
function counted once per stack it is on) and by self samples (the innermost frame), each with
its share of all samples. With MATCH, only stacks that contain MATCH count (e.g. `generate` for
the generation loop). Generic arguments are dropped from the names.
"""
import re
import sys
from collections import Counter


def short(name):
    # Drop generic arguments (nested <...>) and closures' hashes.
    out, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    return re.sub(r"::h[0-9a-f]{16}$", "", "".join(out))


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    match = sys.argv[3] if len(sys.argv) > 3 else None
    threads, incl, self_ = Counter(), Counter(), Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or (match and match not in stack):
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            threads[frames[0]] += n
            names = [short(x) for x in frames[1:]]
            for name in set(names):
                incl[name] += n
            if names:
                self_[names[-1]] += n
    if total == 0:
        sys.exit(f"{path}: no samples" + (f" with {match!r}" if match else ""))
    print(f"{total} samples" + (f" in stacks with {match!r}" if match else ""))
    for t, n in threads.most_common(8):
        print(f"  thread {t}: {n} ({100 * n / total:.1f}%)")
    for title, c in (("inclusive", incl), ("self", self_)):
        print(f"\ntop {top} by {title} samples")
        for name, n in c.most_common(top):
            print(f"{100 * n / total:6.1f}% {n:7d}  {name[:150]}")


if __name__ == "__main__":
    main()
