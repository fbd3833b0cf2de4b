"""One run directory's files, read back: ``metrics.jsonl``, Hydra's ``.hydra/overrides.yaml`` and the values a
run used (:mod:`softmoe.harness.sweeps` reads a sweep's runs with them). A damaged file is a
:class:`BadDataError` naming it, not a traceback from the decoder or the YAML parser: a torn last line of
``metrics.jsonl`` (a killed run) is skipped instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

from .errors import BadDataError
from .telemetry import json_lines


def parse_overrides(lines: Iterable[str]) -> Dict[str, str]:
    """Hydra override strings (``a.b=1``, ``+x=y``, ``~z``) as a dict; deletions are dropped."""
    overrides = {}
    for line in lines:
        line = str(line).strip()
        if "=" not in line or line.startswith("~"):
            continue
        key, value = line.split("=", 1)
        overrides[key.lstrip("+")] = value
    return overrides


def override_value(value: Any) -> str:
    """A config value as a Hydra override writes it: ``8``, ``0.001``, ``soft``, ``true``, ``null``, ``[2,3]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{override_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def values_used(run_dir: Path, keys: Iterable[str]) -> Dict[str, str]:
    """The value each of ``keys`` had in the run of ``run_dir``, written as an override would: a config group's
    option from Hydra's ``.hydra/hydra.yaml`` (``moe=dense``), a config key's from ``.hydra/config.yaml``. A run that
    left a key at its default is then grouped with those that typed the default (was: a group of its own, shown as
    ``None``), and ``0.001`` with ``1e-3``. Keys neither file holds (``hydra.*``; a run saved without them) are left
    out, so the typed value stays."""
    from omegaconf import OmegaConf

    hydra_file, config_file = run_dir / ".hydra" / "hydra.yaml", run_dir / ".hydra" / "config.yaml"
    hydra = _read_yaml(hydra_file) if hydra_file.exists() else OmegaConf.create()
    choices = OmegaConf.select(hydra, "hydra.runtime.choices", default=None) or {}
    config = _read_yaml(config_file) if config_file.exists() else OmegaConf.create()
    values: Dict[str, str] = {}
    for key in keys:
        if key in choices:
            values[key] = override_value(choices[key])
            continue
        value = OmegaConf.select(config, key, default=_ABSENT, throw_on_resolution_failure=False)
        if value is not _ABSENT and not OmegaConf.is_config(value):  # a leaf; ${hydra:...} resolves to None here
            values[key] = override_value(value)
    return values


_ABSENT = object()


def _read_yaml(path: Path) -> Any:
    """A Hydra YAML file as an OmegaConf config; a damaged one named in one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        return OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError, OSError) as error:
        raise damaged(path, (str(error) or type(error).__name__).splitlines()[0]) from None


def numeric_history(events: Iterable[Mapping[str, Any]]) -> Dict[str, List[float]]:
    """Every numeric value of the logged events, by key, in logging order. Keys starting with ``_`` are
    W&B's bookkeeping (``_step``, ``_runtime``, ``_timestamp``), not metrics."""
    history: Dict[str, List[float]] = {}
    for event in events:
        for key, value in event.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("_"):
                history.setdefault(key, []).append(float(value))
    return history


def read_metrics(path: Path) -> Dict[str, List[float]]:
    """Every numeric value of ``metrics.jsonl``, by key, in logging order (a torn last line is skipped)."""
    try:
        return numeric_history(json_lines(path))
    except (UnicodeDecodeError, OSError) as error:  # damaged bytes, a folder of that name: named, no traceback
        raise damaged(path, "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror) from None


def read_overrides(path: Path) -> Dict[str, str]:
    """A run's ``.hydra/overrides.yaml``: Hydra's YAML list of override strings."""
    import yaml

    try:
        lines = yaml.safe_load(path.read_text()) or []
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise damaged(path, (str(error) or type(error).__name__).splitlines()[0]) from None
    if not isinstance(lines, list):
        raise damaged(path, "not Hydra's list of overrides")
    return parse_overrides(lines)


def damaged(path: Path, reason: str) -> BadDataError:
    """A run directory's file that cannot be read, named in one line, as ``collect`` prints it."""
    return BadDataError(f"{path}: damaged ({reason}); restore it, or move its run directory out of the folder to "
                        "tabulate the others")
