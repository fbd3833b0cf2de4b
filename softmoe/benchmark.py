"""``python -m softmoe.benchmark``: speed and memory of the Soft MoE layer and model (the code is ``softmoe/bench/``).

    python -m softmoe.benchmark --help
"""

from softmoe.bench.cli import main
from softmoe.harness.errors import run_command

if __name__ == "__main__":
    run_command(lambda: 1 if main().get("failed") else 0)  # a suite section that failed: its figures are missing
