"""Plan the memory of a run on many GPUs before asking for them: per rank and per layout, what fits.

    python -m softmoe.plan model=vit_huge data=imagefolder moe.num_experts=128 trainer.batch_size=4096 \\
        world_size=64 gpu_memory_gb=80

Takes the train config (``conf/plan.yaml`` composes ``conf/train.yaml``) and its overrides; builds the model on
the meta device and prints :mod:`softmoe.harness.memory`'s table. A bad value stops it with one line (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from softmoe.harness.config import check_config, check_launch
from softmoe.harness.errors import ConfigError, run_command
from softmoe.harness.memory import Plan, format_plan, make_plan, model_shapes
from softmoe.harness.overrides import composition_error
from softmoe.harness.rules import format_value, plain, positive_int, positive_number

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # what the commands' @hydra.main(config_path="../conf") reads


def compose_plan_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved ``conf/plan.yaml`` with ``overrides``; raises :class:`ConfigError` naming a bad key."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("plan", overrides=list(overrides))
        config = plain(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    for key, rule in (
        ("world_size", positive_int),
        ("gpus_per_node", positive_int),
        ("gpu_memory_gb", positive_number),
    ):
        problem = rule(config[key], config)
        if problem is not None:
            raise ConfigError(f"{key}={format_value(config[key])}: {problem}")
    # the run as the train command would check it, started by torchrun on world_size GPUs (not this machine's)
    check_config(config, on_this_machine=False)
    check_launch(config, torchrun=True, world_size=config["world_size"])
    return config


def plan_run(overrides: Sequence[str]) -> Plan:
    config = compose_plan_config(overrides)
    shapes = model_shapes(config)
    return make_plan(
        shapes, config["world_size"], config["trainer"]["batch_size"], config["gpu_memory_gb"], config["gpus_per_node"]
    )


def command_line_error(overrides: Sequence[str]) -> Optional[str]:
    """Why the command line cannot be planned, in one line (as the train command words it), or None."""
    flags = [argument for argument in overrides if argument.startswith("-")]
    if flags:
        return f"{flags[0]}: python -m softmoe.plan takes the train command's overrides (key=value) only"
    return composition_error(overrides, "plan")


def main(argv: Optional[Sequence[str]] = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if overrides in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    problem = command_line_error(overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        plan = plan_run(overrides)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_plan(plan, " ".join(overrides) or "defaults"))


if __name__ == "__main__":
    run_command(main)
