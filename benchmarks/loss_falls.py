"""Exit 0 when a run's training loss fell: the mean of its last 10 logged train losses is at
least 1.0 below the mean of its first 10 (benchmarks/gpu.sh checks its 100-step runs)."""

from __future__ import annotations

import json
import statistics
import sys


def main(path: str) -> int:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]
    if len(losses) < 20:
        print(f"{path}: only {len(losses)} train losses logged; need 20", file=sys.stderr)
        return 1
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    print(
        f"train loss: first 10 steps {first:.3f}, last 10 steps {last:.3f} ({len(losses)} logged)"
    )
    return 0 if last <= first - 1.0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
