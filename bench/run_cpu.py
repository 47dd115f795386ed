"""`make bench`: the CPU benchmarks, in sequence (about 45 minutes on 2 cores; the full laptop study is 20).

Each writes ``bench/results/<name>.json``; ``bench/RESULTS.md`` summarises them.
"""

from __future__ import annotations

import sys

from bench import data_path, early_stopping, overhead, strategies, utilisation


def main() -> int:
    steps = [
        lambda: strategies.main(["--backbones", "segresnet,unet", "--size", "32", "--width", "8", "--steps", "5"]),
        lambda: overhead.main(["--trials", "6", "--budget", "laptop"]),
        lambda: data_path.main(["--budget", "laptop", "--repeats", "3"]),
        lambda: early_stopping.main(["--budget", "laptop", "--per-cell", "6"]),
        lambda: utilisation.main(["--run", "--budget", "laptop"]),
    ]
    return max(step() for step in steps)


if __name__ == "__main__":
    sys.exit(main())
