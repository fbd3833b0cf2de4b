"""AdamW's traffic per step and its moments' memory, float32 against bf16 moments, for the suite's models
(counted on the meta device: exact, no weights allocated).

    python experiments/optimizer_state/state_bytes.py

Prints the table of experiments/optimizer_state/README.md ("What it saves"), then what the expert banks' bf16
copies move per step: recast by the bank after the step (read 4 bytes, write 2 per expert weight) or written by
softmoe.optim.AdamW's update (2), as experiments/throughput/README.md quotes it.
"""

import argparse

from softmoe.bench.model import build_benchmark_model
from softmoe.bench.shapes import MODEL_SHAPES
from softmoe.bench.step_floor import (
    ADAMW_BF16_STATE_BYTES_PER_PARAM,
    ADAMW_BYTES_PER_PARAM,
    CAST_BYTES_PER_PARAM,
    COPY_WRITE_BYTES,
    parameter_counts,
)

MOMENTS = 2  # exp_avg and exp_avg_sq


def main() -> None:
    print("| model | parameters | AdamW traffic per step, float32 moments | bf16 moments | moments in memory, float32 "
          "| bf16 |\n|---|---|---|---|---|---|")
    for shape in ("vit_s16", "vit_b16"):
        for kind in ("dense", "soft_moe"):
            model = build_benchmark_model(MODEL_SHAPES[shape], kind, "meta")
            count = parameter_counts(model, expert_grads_written_in_float32=True).total
            name = getattr(MODEL_SHAPES[shape], f"{kind}_model")
            print(f"| {name} | {count / 1e6:.1f} M | {ADAMW_BYTES_PER_PARAM * count / 1e9:.2f} GB "
                  f"| {ADAMW_BF16_STATE_BYTES_PER_PARAM * count / 1e9:.2f} GB | {MOMENTS * 4 * count / 1e9:.2f} GB "
                  f"| {MOMENTS * 2 * count / 1e9:.2f} GB |")
    print("\n| model | expert weights in bf16 copies | copies recast by the banks | written by the update |\n"
          "|---|---|---|---|")
    for shape in ("vit_s16", "vit_b16"):
        model = build_benchmark_model(MODEL_SHAPES[shape], "soft_moe", "meta")
        copied = parameter_counts(model, expert_grads_written_in_float32=True).expert_weights
        print(f"| {MODEL_SHAPES[shape].soft_moe_model} | {copied / 1e6:.1f} M | "
              f"{CAST_BYTES_PER_PARAM * copied / 1e9:.2f} GB | {COPY_WRITE_BYTES * copied / 1e9:.2f} GB |")


if __name__ == "__main__":
    # no options: --help says what it does (before, it ran, and report.py rewrote the README's tables)
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
