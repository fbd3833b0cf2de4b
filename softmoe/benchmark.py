"""``python -m softmoe.benchmark``: speed and memory of the Soft MoE layer and model (the code is ``softmoe/bench/``).

    python -m softmoe.benchmark --help
"""

import sys

from softmoe.bench.cli import main

if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)  # a suite section that failed: its figures are missing
