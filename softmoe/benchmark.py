"""``python -m softmoe.benchmark``: speed and memory of the Soft MoE layer and model (the code is ``softmoe/bench/``).

    python -m softmoe.benchmark --help
"""

from softmoe.bench.cli import main

if __name__ == "__main__":
    main()
