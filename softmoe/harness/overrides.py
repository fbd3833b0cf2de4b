"""Command-line overrides Hydra cannot compose, reported as one line with the closest valid key or option.

Hydra reports a mistyped key (``trainer.max_step=10``) or a missing group option (``model=vit_mega``) in 7-15
lines with no suggestion, and a sweep without ``-m`` (``moe.num_experts=4,8``) in 5, and exits 1; every other
mistake gets one line and exit status 2. The commands call :func:`composition_error` before Hydra starts (which
also keeps Hydra from making a run directory for a run that cannot start):

    error: trainer.max_step=10: not a key of the config; did you mean trainer.max_steps?

A key added outside every section (``+sed=3``) composes, and nothing reads it: :func:`unread_addition` refuses it.
A key the chosen option of a group lacks (``data.root`` beside the default ``data=digits``) is named with that
option's keys (:func:`unknown_key`).

An experiment file without its first line ``# @package _global_`` composes with its keys under ``experiment.*``,
where nothing reads them, and the defaults ran; :func:`not_global` refuses it (and any group whose files are global).

``HYDRA_FULL_ERROR=1`` skips the check, so Hydra's full message and stack trace are shown as before.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from hydra.plugins.config_source import ConfigSource
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .plausibility import CONF_DIR, group_options
from .rules import closest, closest_key, format_value, import_target

HYDRA_FLAGS = ("-m", "--multirun")  # any other flag (--help, --cfg, -cn ...) leaves the command line to Hydra


def multirun_flag_first(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``-m`` (``--multirun``) moved before the overrides, where Hydra's parser takes it:
    ``debug=default -m seed=0,1`` was 8 lines of usage and "unrecognized arguments"."""
    return [*(a for a in argv if a in HYDRA_FLAGS), *(a for a in argv if a not in HYDRA_FLAGS)]


def plain_overrides(parsed: Sequence[Override]) -> list[str]:
    """The overrides with each sweep replaced by its first value: what the first job of a sweep composes (interval
    sweeps, an Optuna search's, are left to their sweeper)."""
    plain = []
    for override in parsed:
        if not override.is_sweep_override():
            plain.append(override.input_line)
        elif override.is_discrete_sweep():
            first = next(iter(override.sweep_string_iterator()))
            plain.append(f"{override.get_key_element()}={first}")
    return plain


def compose_config(config_name: str, overrides: Sequence[str], conf_dir: Path) -> DictConfig:
    """The config (with its ``hydra`` node), read-only: the command-line checks compose the first job's config
    more than once before a command starts (:func:`composition_error`, then ``sweep_check``), so it is kept, for as
    long as the config files it may read stay as they are: a process that composes again after a file changed (a
    notebook, a test, a forked command) gets the file's new contents, not the config composed before."""
    return _composed(config_name, tuple(overrides), str(conf_dir), config_files_state(overrides, conf_dir))


def config_files_state(overrides: Sequence[str], conf_dir: Path) -> str:
    """A digest of every YAML file (name and contents) of ``conf_dir`` and of the folders a ``hydra.searchpath``
    override adds: what a kept composition is only as current as. Contents, not modification times, which a file
    rewritten within the same few milliseconds keeps (the kernel's clock for them ticks that coarsely); reading
    them all (some 90 files, 50 KB) takes a few milliseconds, against the composition's tenths of a second."""
    searchpath = [line for line in overrides if line.startswith("hydra.searchpath=")]
    try:
        folders = search_dirs(OverridesParser.create().parse_overrides(searchpath), Path(conf_dir))
    except HydraException:  # composing says what is wrong with it
        folders = [Path(conf_dir)]
    digest = hashlib.blake2b(digest_size=16)
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                contents = path.read_bytes()
            except OSError:  # removed meanwhile, or unreadable: composing reads it (or not) and says so
                contents = b"\0unreadable"
            digest.update(f"{path}\0{len(contents)}\0".encode() + contents)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _composed(config_name: str, overrides: tuple, conf_dir: str, files_state: str) -> DictConfig:
    # job_name: the name Hydra's own run gives the job, its module's (each command is named after its config:
    # softmoe/train.py composes train), so ${hydra.job.name} in hydra.run.dir resolves here as the run will; the
    # compose API's own default ('app') had the checks look at another run directory
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name=config_name):
        config = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(config, True)  # shared by every caller: none may change it
    return config


def runs_as_multirun(argv: Sequence[str], composed: DictConfig) -> bool:
    """Whether the command runs a sweep: ``-m`` on its command line, or a config that sets ``hydra.mode: MULTIRUN``
    (the experiments do)."""
    mode = OmegaConf.select(composed, "hydra.mode")
    return any(argument in HYDRA_FLAGS for argument in argv) or "MULTIRUN" in str(mode)


def all_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config, sections included (``trainer``, ``trainer.max_steps``)."""
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys.extend(all_keys(value, f"{dotted}."))
    return keys


def group_overrides(parsed: Sequence[Override], conf_dir: Path) -> list[Override]:
    return [override for override in parsed if (conf_dir / override.key_or_group).is_dir()]


def unused_group(parsed: Sequence[Override], config_name: str, conf_dir: Path) -> Optional[str]:
    """A group the config does not compose (``experiment=...`` to evaluate, whose config is a checkpoint's), which
    Hydra refuses as "Could not override 'experiment'. No match in the defaults list.", with the keys it takes."""
    try:
        base = compose_config(config_name, [], conf_dir)
    except (HydraException, OmegaConfBaseException):
        return None
    choices = OmegaConf.select(base, "hydra.runtime.choices") or {}
    for override in group_overrides(parsed, conf_dir):
        if override.key_or_group not in choices:
            return f"{override.input_line}: not a config group of {config_name}; its keys: {top_level(base)}"
    return None


def top_level(base: DictConfig) -> str:
    """What a config takes at its top level, for a message: ``seed, model, ...; its groups: data, ...``."""
    groups = sorted(group for group in OmegaConf.select(base, "hydra.runtime.choices") or {}
                    if not group.startswith("hydra"))
    return ", ".join(key for key in base if key != "hydra") + (f"; its groups: {', '.join(groups)}" if groups else "")


def search_dirs(parsed: Sequence[Override], conf_dir: Path) -> list[Path]:
    """``conf_dir``, then each folder a ``hydra.searchpath=[file://...]`` override adds, in Hydra's order: a user's
    own experiment files kept outside the repository are options too (``pkg://`` entries are left out)."""
    entries = next((override.value() for override in parsed if override.key_or_group == "hydra.searchpath"), None)
    entries = entries if isinstance(entries, list) else []
    return [conf_dir, *(Path(str(entry).removeprefix("file://")) for entry in entries
                        if "://" not in str(entry) or str(entry).startswith("file://"))]


def option_values(override: Override) -> list[Any]:
    """The values an override gives a key or group: a discrete sweep's each, else its one value."""
    return list(override.sweep_iterator()) if override.is_discrete_sweep() else [override.value()]


def missing_option(parsed: Sequence[Override], conf_dir: Path) -> Optional[str]:
    """The first group option (of any job of a sweep) that no ``conf/<group>/<option>.yaml`` holds (nor the group's
    folder in a ``hydra.searchpath`` one), in one line."""
    dirs = search_dirs(parsed, conf_dir)
    for override in group_overrides(parsed, conf_dir):
        options = sorted({option for folder in dirs for option in group_options(override.key_or_group, folder)})
        for value in option_values(override):
            if override.type != OverrideType.DEL and value is None:  # Hydra: a ValueError and its traceback
                return (f"{override.key_or_group}=null: a config group takes one of its options "
                        f"({', '.join(options)}); leave {override.key_or_group} out for the config's own default")
            if override.type != OverrideType.DEL and isinstance(value, list):  # Hydra would merge the options
                shown = ",".join(map(str, value))
                return (f"{override.key_or_group}=[{shown}]: takes one of its options, not a list (options: "
                        f"{', '.join(options)}); to run each, sweep them: -m {override.key_or_group}={shown}")
            if override.type != OverrideType.DEL and str(value) not in options:
                return (
                    f"{override.key_or_group}={value}: not an option of {override.key_or_group}"
                    f"{closest(str(value), options).replace('mean ', f'mean {override.key_or_group}=')} "
                    f"(options: {', '.join(options)})"
                )
    return None


def package_of(path: Path) -> Optional[str]:
    """The package a config file's header names (``# @package _global_``), read as Hydra reads it: from the comment
    lines that begin the file, up to the first other line; None without one, or with one Hydra cannot read."""
    try:  # Hydra's own reader (a private helper of hydra-core 1.3): the check reads headers as Hydra will
        return ConfigSource._get_header_dict(path.read_text())["package"]
    except ValueError:  # "Expected header format: KEY VALUE": Hydra's own error names it
        return None
    except AttributeError:  # another hydra-core without it: no file counts as global, so nothing is refused
        return None


def is_global_group(group: str, conf_dir: Path, option: str) -> bool:
    """Whether every file of ``conf_dir/group`` but ``option``'s own is ``# @package _global_`` (experiment, launcher,
    debug, hparams_search): each option of such a group sets keys across the whole config."""
    others = [path for path in (conf_dir / group).glob("*.yaml") if path.stem != option]
    return bool(others) and all(package_of(path) == "_global_" for path in others)


def option_file(group: str, option: str, dirs: Sequence[Path]) -> Optional[Path]:
    """The file of a group option: the first ``<folder>/<group>/<option>.yaml`` of :func:`search_dirs`, or None."""
    return next((folder / group / f"{option}.yaml" for folder in dirs if (folder / group / f"{option}.yaml").is_file()),
                None)


def not_global(parsed: Sequence[Override], conf_dir: Path) -> Optional[str]:
    """An option (of any job of a sweep) of a group of global files (:func:`is_global_group`) whose own file lacks
    that header, in one line: Hydra puts its keys under ``<group>.*``, where nothing reads them, and runs the defaults
    without a word (its ``hydra.mode: MULTIRUN`` and sweep too)."""
    dirs = search_dirs(parsed, conf_dir)
    for override in (override for override in group_overrides(parsed, conf_dir) if override.type != OverrideType.DEL):
        group = override.key_or_group
        for option in (option for option in option_values(override) if is_global_group(group, conf_dir, option)):
            path = option_file(group, option, dirs)
            package = package_of(path) if path else "_global_"
            if package != "_global_":
                package = package or group.replace("/", ".")
                keys = ", ".join(f"{package}.{key}" for key in OmegaConf.load(path) if key != "defaults")
                shown = path.relative_to(conf_dir.parent) if path.is_relative_to(conf_dir.parent) else path
                return (f"{group}={option}: {shown}'s keys landed under {package}.* ({keys}); its first line must "
                        f"be '# @package _global_', as in every file of {conf_dir.name}/{group}/")
    return None


# Groups whose option is named by the values it sets (experts_slots=16x1: moe.num_experts=16, moe.slots_per_expert=1),
# and names the run (its W&B name, collect's table): a key override that changes one of them makes that name wrong
NAMED_BY_VALUES = ("experts_slots",)


def option_settings(group: str, option: str, dirs: Sequence[Path]) -> dict[str, Any]:
    """The keys a group option's file sets (its top level, under its package) and their values; {} without a file."""
    path = option_file(group, option, dirs)
    if path is None:
        return {}
    package = package_of(path) or group.replace("/", ".")
    prefix = "" if package == "_global_" else f"{package}."
    return {f"{prefix}{key}": value for key, value in OmegaConf.to_container(OmegaConf.load(path)).items()
            if key != "defaults"}


def conflicting_overrides(parsed: Sequence[Override], conf_dir: Path, chosen: Any = None) -> Optional[str]:
    """A key override (of any job of a sweep) that changes a value an option of a :data:`NAMED_BY_VALUES` group sets
    (``experts_slots=16x1 moe.slots_per_expert=2`` trained 16 x 2 as a run named experts_slots=16x1), in one line naming
    both; a key set to the option's own value passes. ``chosen``: ``hydra.runtime.choices``, for the option the config
    itself picks when the overrides name none."""
    dirs = search_dirs(parsed, conf_dir)
    keys = {override.key_or_group: override for override in parsed if override.type != OverrideType.DEL}
    for group in NAMED_BY_VALUES:
        options = option_values(keys[group]) if group in keys else [(chosen or {}).get(group)]
        for option in (str(option) for option in options if option is not None):
            settings = option_settings(group, option, dirs)
            for key, value in settings.items():
                changed = [other for other in option_values(keys[key]) if other != value] if key in keys else []
                if changed:
                    wanted = {**settings, key: changed[0]}
                    match = next((other for other in group_options(group, conf_dir)
                                  if option_settings(group, other, dirs) == wanted), None)
                    instead = (f"{group}={match} alone" if match else
                               f"{' '.join(f'{k}={format_value(v)}' for k, v in wanted.items())} without {group}")
                    return (f"{group}={option} {keys[key].input_line}: {group}={option} sets {key}="
                            f"{format_value(value)} and names the run after it; drop one of the two, e.g. {instead}")
    return None


def group_base(parsed: Sequence[Override], config_name: str, conf_dir: Path) -> Optional[DictConfig]:
    """The config composed with the command line's group options alone (its keys are those a key override may
    name), or None when it does not compose."""
    try:
        return compose_config(config_name, plain_overrides(group_overrides(parsed, conf_dir)), conf_dir)
    except (HydraException, OmegaConfBaseException):
        return None


def missing_key(parsed: Sequence[Override], config_name: str, conf_dir: Path) -> Optional[str]:
    """The first key override naming a key the config lacks (or adding one it has), in one line; a ``logger.*`` key
    beside ``logger=none`` (whose option file lacks it) is told what that logger does with it."""
    groups, base = group_overrides(parsed, conf_dir), group_base(parsed, config_name, conf_dir)
    if base is None:
        return None
    ignored = setting_ignored_without_logger(parsed, base)
    if ignored:
        return ignored
    keys = all_keys(OmegaConf.to_container(base, resolve=False))
    for override in parsed:
        if override in groups or override.key_or_group.startswith("hydra"):
            continue
        key = override.key_or_group
        if override.type == OverrideType.DEL and key in keys and OmegaConf.select(base, key) is None:
            return (f"{override.input_line}: {key} is null already, and Hydra deletes only a key that holds a "
                    f"value; leave {override.input_line} out, or give {key} a value with {key}=...")
        if override.type in (OverrideType.CHANGE, OverrideType.DEL) and key not in keys:
            return unknown_key(override, base, keys, config_name)
        if override.type == OverrideType.ADD and key in keys:
            return f"{override.input_line}: {key} is already a key; set it without the +: {override.input_line[1:]}"
    return None


# Sections of train's config that take keys no option file of theirs has, each checked (config.py): timm's
# VisionTransformer arguments (+model.reg_tokens=4), the arguments of the optimizer's and the scheduler's _target_
# (+optimizer.amsgrad=true). An added key anywhere else is refused, or nothing reads it (unread_addition).
ADDABLE_SECTIONS = ("model", "optimizer", "scheduler")


def unknown_key(override: Override, base: DictConfig, keys: Sequence[str], config_name: str) -> str:
    """Why a key override names no key of ``base`` (the config with the command line's group options), in one line:
    the closest key; else a group option's own keys (``data.root`` is a key of data=imagefolder, not of the default
    data=digits), with the ``+`` spelling only where an added key is read; else the config's top level, with the
    closest key by its last part (evaluate's ``batch_size`` for ``trainer.eval_batch_size``). Was: "(to add a key:
    +data.root=...)" everywhere, a spelling that is refused or, at the top level, ignored."""
    key, line = override.key_or_group, override.input_line
    guess = closest_key(key, keys)
    if guess:
        return f"{line}: not a key of the config{guess}"
    section = key.partition(".")[0]
    choice = (OmegaConf.select(base, "hydra.runtime.choices") or {}).get(section) if "." in key else None
    if choice is not None:
        return group_key_error(line, section, choice, keys) + (
            addition_hint(key, line, base) if override.type == OverrideType.CHANGE else "")
    return f"{line}: not a key of the config{closest_anywhere(key, base, keys, config_name)}"


def addition_hint(key: str, line: str, base: DictConfig) -> str:
    """`` (to add a key: +<line>)`` where an added ``key`` is read: a timm argument of ``model`` (config.py checks
    those), an argument of ``optimizer``'s or ``scheduler``'s ``_target_``; for an argument that target lacks, that
    it takes none by that name (was: ``+optimizer.momentum=0.9`` suggested for AdamW, which the run then refused)."""
    section, _, name = key.partition(".")
    if section not in ADDABLE_SECTIONS:
        return ""
    target = OmegaConf.select(base, f"{section}._target_")
    factory = import_target(target) if section != "model" else None
    if factory is not None:
        parameters = inspect.signature(factory).parameters.values()
        if not any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return f"; nor is {name} an argument of {target}"
    return f" (to add a key: +{line})"


def closest_anywhere(key: str, base: DictConfig, keys: Sequence[str], config_name: str) -> str:
    """``; did you mean <key>?`` for a key typed outside every section, by its last part: the closest top-level key
    (``+sed`` -> ``seed``; evaluate's ``batch_size`` for ``trainer.eval_batch_size``), else a key of a section by
    that very name (``max_steps`` -> ``trainer.max_steps``; ``run.dir`` -> ``hydra.run.dir``, but by its last part
    alone never one of Hydra's own: not ``hydra.hydra_logging.root`` for ``data.root``); else what the config takes
    at its top level. A top-level key spelled as the dotted one comes first: evaluate's ``data_root`` for train's
    ``data.root``."""
    leaf, top = key.rpartition(".")[2], [name for name in base if name != "hydra"]
    if key.replace(".", "_") in top:
        return f"; did you mean {key.replace('.', '_')}?"
    guess = closest_key(leaf, top)
    by_path = (other for other in keys if "." in key and other.endswith(f".{key}"))
    by_leaf = (other for other in keys if "." in other and not other.startswith("hydra.")
               and other.rpartition(".")[2] == leaf)
    same = next(by_path, None) or next(by_leaf, None)
    return guess or (f"; did you mean {same}?" if same else f"; {config_name}'s keys: {top_level(base)}")


def group_key_error(line: str, section: str, choice: Any, keys: Sequence[str]) -> str:
    """``<line>: not a key of <section>=<choice>; its keys are ...``: a group option's own keys (``keys``: every dotted
    key of the config), as the data check names them."""
    own = [key.split(".")[1] for key in keys if key.startswith(f"{section}.") and key.count(".") == 1]
    return f"{line}: not a key of {section}={choice}; its keys are {', '.join(k for k in own if not k.startswith('_'))}"


def unread_addition(parsed: Sequence[Override], config_name: str, conf_dir: Path) -> Optional[str]:
    """A key added outside every section of the config (``+sed=3``, ``+foo.bar=1``; to evaluate, ``+checkpont=last``),
    in one line with the closest key: Hydra composes it, and nothing reads it (was: ``seed`` stayed 0, evaluate took
    best.pt, without a word). Group options (``+experiment=...``) and ``hydra.*`` pass."""
    groups, base = group_overrides(parsed, conf_dir), group_base(parsed, config_name, conf_dir)
    if base is None:
        return None
    keys = all_keys(OmegaConf.to_container(base, resolve=False))
    for override in parsed:
        key = override.key_or_group
        if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD) and override not in groups \
                and not key.startswith("hydra") and key.partition(".")[0] not in base:
            return (f"{override.input_line}: not a key of the config, and nothing reads one added there"
                    f"{closest_anywhere(key, base, keys, config_name)}")
    return None


def composition_error(argv: Sequence[str], config_name: str, conf_dir: Path = CONF_DIR) -> Optional[str]:
    """Why Hydra would refuse this command line (``sys.argv[1:]``), in one line, or None."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or not conf_dir.is_dir():
        return None
    if any(argument.startswith("-") and argument not in HYDRA_FLAGS for argument in argv):
        return None
    overrides = [argument for argument in argv if argument not in HYDRA_FLAGS]
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException as error:  # a syntax error
            return (bare_argument(override, config_name, conf_dir) or placeholder(override)
                    or f"{override}: {str(error).strip().splitlines()[0]} (Hydra's override syntax)")
    parsed = parser.parse_overrides(overrides)
    problem = (unused_group(parsed, config_name, conf_dir) or missing_option(parsed, conf_dir)
               or not_global(parsed, conf_dir))
    if problem:
        return problem
    try:
        composed = compose_config(config_name, plain_overrides(parsed), conf_dir)
    except (HydraException, OmegaConfBaseException) as error:
        return missing_key(parsed, config_name, conf_dir) or hydra_refusal(error)
    sweep_problem = None if runs_as_multirun(argv, composed) else sweep_without_multirun(parsed)
    return (sweep_problem or unread_addition(parsed, config_name, conf_dir)
            or setting_ignored_without_logger(parsed, composed)
            or conflicting_overrides(parsed, conf_dir, OmegaConf.select(composed, "hydra.runtime.choices")))


def hydra_refusal(error: Exception) -> str:
    """Why Hydra did not compose, in one line: a value a schema refuses (Hydra's own, ``hydra.mode: multirun``, on the
    command line or in a config file) named with its key and what is allowed, and the file that set it; else the first
    line of Hydra's message (was: "In 'experiment/x': ValidationError raised while composing config:")."""
    refused = error
    while refused is not None and not getattr(refused, "full_key", None):
        refused = refused.__cause__ or refused.__context__
    if refused is None:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"{first_line} (HYDRA_FULL_ERROR=1 shows Hydra's message)"
    allowed = str(refused).strip().splitlines()[0]
    choices = re.fullmatch(r"Invalid value '.*', expected one of \[(.*)\]", allowed)
    where = re.match(r"In '([^']+)'", str(error))
    return (f"{refused.full_key}={format_value(getattr(refused, 'value', '?'))}: "
            f"{f'must be one of {choices[1]}' if choices else allowed}{f' (in {where[1]}.yaml)' if where else ''}")


def placeholder(argument: str) -> Optional[str]:
    """A value pasted from the docs with its placeholder still in it (``run_dir=outputs/runs/<date>/<time>``),
    which Hydra's grammar refuses as "token recognition error at: '<'", in one line saying what to put there."""
    found = re.search(r"<[A-Za-z_ -]+>", argument)
    if found is None:
        return None
    return (f"{argument}: {found[0]} is a placeholder; put your own value there "
            f"(run directories: ls -d outputs/runs/*/*)")


# What a path typed without its key most likely meant, by command: (for a directory, for a checkpoint file)
PATH_ARGUMENTS = {
    "train": ("hydra.run.dir={} (to continue the run there)", "trainer.resume={} (to start a new run from it)"),
    "evaluate": ("run_dir={}", "run_dir={parent} checkpoint={stem}"),
}


def bare_argument(argument: str, config_name: str, conf_dir: Path) -> Optional[str]:
    """An argument without ``=`` (``vit_small``, a run directory's path), which Hydra's parser refuses in its own
    grammar's terms, in one line with what it likely meant: the key that takes that path, or the config group
    that has that option. None for an argument with ``=`` (a real syntax error: Hydra's message)."""
    if "=" in argument or argument.startswith("~"):
        return None
    path = Path(argument).expanduser()
    for_directory, for_file = PATH_ARGUMENTS.get(config_name, (None, None))
    meant = None
    if path.is_dir() and for_directory:
        meant = for_directory.format(argument)
    elif path.is_file() and for_file and (config_name != "evaluate" or path.stem in ("best", "last")):
        meant = for_file.format(argument, parent=path.parent, stem=path.stem)
    else:
        try:
            groups = OmegaConf.select(compose_config(config_name, [], conf_dir), "hydra.runtime.choices") or {}
        except (HydraException, OmegaConfBaseException):
            groups = {}
        options = [f"{group}={argument}" for group in groups
                   if "/" not in group and argument in group_options(group, conf_dir)]
        meant = " or ".join(options) or None
    guess = f"; did you mean {meant}?" if meant else ""
    return f"{argument}: not key=value (each argument sets a key, or picks a config group's option){guess}"


def setting_ignored_without_logger(parsed: Sequence[Override], composed: DictConfig) -> Optional[str]:
    """A ``logger.*`` key typed beside ``logger=none`` (in any job of a sweep), which writes ``metrics.jsonl`` only
    and would ignore it without a word. Keys an experiment's config sets (``logger.tags``) are not typed, so pass."""
    chosen = [override for override in parsed if override.key_or_group == "logger"]
    if chosen and chosen[-1].is_discrete_sweep():
        loggers = [str(value) for value in chosen[-1].sweep_string_iterator()]
    else:
        loggers = [str(OmegaConf.select(composed, "hydra.runtime.choices.logger"))]
    if "none" not in loggers:
        return None
    for override in parsed:
        if override.key_or_group.startswith("logger.") and override.key_or_group != "logger.backend":
            return (f"{override.input_line}: logger=none writes metrics.jsonl only and ignores "
                    f"{override.key_or_group}; choose logger=wandb to use it, or leave it out")
    return None


def sweep_without_multirun(parsed: Sequence[Override]) -> Optional[str]:
    """A sweep (``moe.num_experts=4,8``) on a single run's command line, which Hydra refuses in 5 lines, in one."""
    for override in parsed:
        if override.is_discrete_sweep():
            values = ",".join(override.sweep_string_iterator())
            return (f"{override.input_line}: several values; add -m to sweep over them (one job each), or write "
                    f"{override.get_key_element()}=[{values}] for a list")
        if override.is_sweep_override():
            return f"{override.input_line}: a sweep; add -m to run it"
    return None
