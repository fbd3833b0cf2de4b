"""The run directory a command line names, checked before Hydra makes it: Hydra would stop on a ``FileExistsError``
or ``FileNotFoundError`` traceback for one that cannot be made, and take an empty one as the current directory (the
repository checkout, as a rule), where the run's files would land among the sources."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .overrides import HYDRA_FLAGS, compose_config, plain_overrides, runs_as_multirun
from .plausibility import CONF_DIR


def no_directory_reason(path: Path) -> Optional[str]:
    """Why no directory can be at ``path``: a file there or on its way, or a nearest existing folder that takes no new
    one (``/proc``, no permission), found by making and removing a temporary folder in it; an existing ``path``
    that takes none (read-only: a rerun's train.log, checkpoints and metrics cannot be written there); None when
    one can."""
    for place in (path, *path.parents):
        if place.is_dir():
            try:
                tempfile.TemporaryDirectory(dir=place).cleanup()
            except OSError as error:
                if place == path:
                    return f"takes no new files ({error.strerror})"
                return f"no folder can be made in {place} ({error.strerror})"
            return None
        if place.exists() or place.is_symlink():
            return f"{place} is a file" if place == path else f"{place}, on its path, is a file"
    return None


def output_dir(argv: Sequence[str], config_name: str,
               conf_dir: Path = CONF_DIR) -> Optional[tuple[str, Optional[Path]]]:
    """(``hydra.run.dir`` or, for a sweep, ``hydra.sweep.dir``; the directory it names) of this command line, as
    Hydra is about to resolve it (``${now:}`` a moment earlier), or None when it does not compose. The directory is
    None for an empty value (``hydra.run.dir=$RUN`` with ``$RUN`` unset), which Hydra takes as the current one, and
    for a sweep's empty ``hydra.sweep.subdir`` (then the key returned)."""
    overrides = [argument for argument in argv if argument not in HYDRA_FLAGS]
    if any(argument.startswith("-") for argument in overrides):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        composed = compose_config(config_name, plain_overrides(parsed), conf_dir)
    except (HydraException, OmegaConfBaseException, ValueError):  # ValueError: a group set to null (Hydra's own);
        return None  # composition_error names what is wrong
    key = "hydra.sweep.dir" if runs_as_multirun(argv, composed) else "hydra.run.dir"
    if key == "hydra.sweep.dir" and OmegaConf.select(composed, "hydra.sweep.subdir",  # ${hydra.job.num}: None here
                                                     throw_on_resolution_failure=False) == "":
        return "hydra.sweep.subdir", None
    directory = OmegaConf.select(composed, key, throw_on_resolution_failure=False)
    if directory is None:
        return None
    return key, Path(directory) if str(directory).strip() else None


def output_dir_error(planned: Optional[tuple[str, Optional[Path]]], argv: Sequence[str] = ()) -> Optional[str]:
    """:func:`directory_error`, naming the override of ``argv`` that made the directory where the command line did
    not name the key itself (``paths.output_dir=/proc/x`` makes ``hydra.run.dir=/proc/x/runs/<date>/<time>``)."""
    problem = directory_error(planned)
    if problem is None:
        return None
    given = [a for a in argv if a.lstrip("+").partition("=")[0] in (planned[0], "paths.output_dir")]
    if given and not given[-1].lstrip("+").startswith(f"{planned[0]}="):
        return f"{problem} (from {given[-1]})"
    return problem


def directory_error(planned: Optional[tuple[str, Optional[Path]]]) -> Optional[str]:
    """Why Hydra could not make the run directory :func:`output_dir` found (a sweep's: ``hydra.sweep.dir``), in one
    line naming the key, or None; Hydra would stop on a ``FileExistsError`` or ``FileNotFoundError`` traceback.
    An empty one Hydra would take as the current directory (the repository checkout, as a rule): the run's files,
    or the sweep's job folders, would land among the sources, and the next such run would resume from them."""
    if planned is None:
        return None
    key, directory = planned
    allowed = "it must name a directory, or where one can be made"
    if key == "hydra.sweep.subdir":
        return (f"{key}=: empty, which would put every job's files in the sweep directory itself, one job's over "
                "another's; it must name a folder per job, as the default ${hydra.job.num} does")
    if directory is None:
        what = "the sweep's job folders" if key == "hydra.sweep.dir" else "the run's files"
        return f"{key}=: empty (an unset shell variable?), which would put {what} in the current directory; {allowed}"
    if key == "hydra.run.dir" and directory.resolve() == Path.cwd().resolve():  # what an empty one does (a sweep's
        # job folders are folders of their own there)
        return (f"{key}={directory}: the current directory, which would put the run's files among whatever it holds "
                "(the checkout's sources, as a rule), and the next such run would resume from them; name a folder of "
                "their own, as the default outputs/runs/<date>/<time> does")
    problem = no_directory_reason(directory)
    if problem and directory.is_dir():  # a rerun's directory on a read-only disk
        return (f"{key}={directory}: {problem}, and a run writes its train.log, checkpoints and metrics there; copy "
                f"it to a folder that takes them and name that, or another {key}")
    return f"{key}={directory}: {problem}; {allowed}" if problem else None
