"""Export a training checkpoint's whole model as one ``.safetensors`` file, for sharing:

    python -m softmoe.to_safetensors outputs/runs/<run>/last.dcp model.safetensors   # an FSDP run's sharded checkpoint
    python -m softmoe.to_safetensors outputs/runs/<run>/best.pt model.safetensors    # or a single-file one

The file holds the single-process state dict (``timm.create_model(...).load_state_dict(load_file(path))``) and, as
string metadata, the run's resolved config (``config``, JSON) and its ``step``. The sharded checkpoint is read on
this host's CPU: the model must fit in its memory (the optimizer state is not read).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError
from safetensors.torch import save_file

from softmoe.harness import sharded_checkpoint
from softmoe.harness.checkpoint import load_checkpoint
from softmoe.harness.errors import CheckpointError, CheckpointWriteError, run_command

PROG = "python -m softmoe.to_safetensors"
USAGE = PROG + " {checkpoint} {output}"


def export(checkpoint: Path, output: Path) -> Path:
    """Write ``checkpoint``'s model (a ``.pt`` file or a sharded ``.dcp`` directory) to ``output``."""
    checkpoint = Path(checkpoint)
    state = sharded_checkpoint.read_checkpoint(checkpoint) if checkpoint.is_dir() else load_checkpoint(checkpoint)
    tensors = {key: value.contiguous() for key, value in state["model"].items()}
    try:  # safetensors writes a temporary file beside output and renames it: a failed write leaves no part of it
        save_file(tensors, str(output), metadata={"config": state["config"], "step": str(state["step"])})
    except (OSError, SafetensorError) as error:  # a folder that takes no files (/proc), a full disk
        reason = str(error).removeprefix("Error while serializing: ")
        raise CheckpointWriteError(f"output {output}: could not be written ({reason}); name a .safetensors file in a "
                                   "folder you can write to") from None
    return Path(output)


def argument_problem(checkpoint: Path, output: Path) -> Optional[str]:
    """What is wrong with the two paths, in one line, before anything is read: a checkpoint that is not one, an output
    that would replace a file that is not a ``.safetensors`` file (a training checkpoint: its run could no longer
    resume) or could not be written."""
    named = {name: str(path) for name, path in (("checkpoint", checkpoint), ("output", output))}
    given = [text for name, text in named.items() if text.startswith(f"{name}=") and not Path(text).exists()]
    if given:  # evaluate's checkpoint=last habit: argparse takes "checkpoint=..." as the path itself
        paths = {name: text.split("=", 1)[1] if text in given else text for name, text in named.items()}
        return f"{given[0]}: this command takes its two paths in order, without names: {USAGE.format(**paths)}"
    if not checkpoint.exists():
        return f"checkpoint {checkpoint}: no such file or directory"
    if checkpoint.is_dir() and checkpoint.suffix != sharded_checkpoint.SUFFIX:
        return (f"checkpoint {checkpoint}: a directory, not a checkpoint; name a run's best.pt or last.pt (or a "
                "sharded best.dcp or last.dcp directory)")
    if checkpoint.suffix == ".safetensors":
        return (f"checkpoint {checkpoint}: a .safetensors file, an export already; name the training checkpoint it "
                "came from (a run's best.pt or last.pt)")
    not_whole = sharded_checkpoint.train_state_not_a_checkpoint(checkpoint)
    if not_whole:
        return f"checkpoint {checkpoint}: {not_whole}"
    if output.exists() and output.resolve() == checkpoint.resolve():
        return f"output {output}: is the checkpoint itself; name a new .safetensors file, e.g. model.safetensors"
    if output.is_dir():
        return f"output {output}: a directory; name the .safetensors file to write, e.g. {output / 'model.safetensors'}"
    if output.exists() and output.suffix != ".safetensors":
        return (f"output {output}: an existing file that is not a .safetensors file, which this would replace; name a "
                "new file, or a .safetensors file to overwrite")
    folder = output.parent
    if not folder.is_dir():
        return f"output {output}: its folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"output {output}: its folder {folder} is not writable"
    return None


def main(argv: list[str]) -> int:
    lines = __doc__.splitlines()  # the one-line summary, then the two examples
    parser = argparse.ArgumentParser(
        prog=PROG, description=lines[0].rstrip(":").replace("``", "") + ".",
        epilog="examples:\n" + "\n".join(line[2:] for line in lines[2:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="last.pt / best.pt, or a sharded last.dcp / best.dcp directory")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    problem = argument_problem(args.checkpoint, args.output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        path = export(args.checkpoint, args.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_command(lambda: main(sys.argv[1:]))
