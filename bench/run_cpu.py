"""`make bench`: the CPU benchmarks that exist so far, in sequence."""

from __future__ import annotations

import sys

from bench import strategies


def main() -> int:
    return strategies.main(["--backbones", "segresnet,unet", "--size", "32", "--width", "8", "--steps", "5"])


if __name__ == "__main__":
    sys.exit(main())
