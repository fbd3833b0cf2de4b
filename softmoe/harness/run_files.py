"""One run directory's files, read back: ``metrics.jsonl`` and Hydra's ``.hydra/overrides.yaml``
(:mod:`softmoe.harness.sweeps` reads a sweep's runs with them). A damaged file is a :class:`BadDataError` naming it,
not a traceback from the decoder or the YAML parser: a torn last line of ``metrics.jsonl`` (a killed run) is
skipped instead."""

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
