"""The vocabulary every config check is written in (``config.py`` for the run, ``data/config.py`` for data).

A rule takes a value and the section it sits in (for checks across keys) and returns None for a good value,
else what is allowed: ``"must be a positive integer"``. :func:`check_section` names the key and raises
:class:`ConfigError`: ``<section>.<key>=<value>: <rule's text>``. :func:`plain` turns a config into the plain,
resolved dict the checks (and the run) read. :func:`format_value` and :func:`counted` are how a message writes a
value and a count. :func:`closest_key` is the one "did you mean": an unknown key typed on the
command line (``overrides.py``) or written in a config file (:func:`check_known`) is named with the closest known one.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softmoe._checks import is_int, is_number

from .errors import ConfigError

Rule = Callable[[Any, Mapping[str, Any]], Optional[str]]
HYDRA_KEYS = ("_target_", "_partial_", "_convert_")  # instantiate's own keys, in any section


def plain(cfg: Any, name: str = "config") -> dict[str, Any]:
    """``cfg`` (a DictConfig or a mapping, ``name`` in errors) as a plain dict with every interpolation resolved,
    without Hydra's own ``hydra`` node (present when composed with ``return_hydra_config=True``)."""
    if isinstance(cfg, DictConfig):
        if "hydra" in cfg:  # the root only: a masked copy of a section would lose its root, which it interpolates
            cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as error:  # e.g. an interpolation to a key that does not exist
            first_line = str(error).splitlines()[0]
            raise ConfigError(f"{getattr(error, 'full_key', '') or name}: {first_line}") from None
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"{name} must be a mapping of keys, got {type(cfg).__name__}")


def check_section(
    section: str, values: Mapping[str, Any], rules: Mapping[str, Rule], *,
    required: Optional[str] = "every key of conf/{section}/*.yaml is needed",
) -> None:
    """Raise :class:`ConfigError` for the first key of ``rules`` that ``values`` (the config section ``section``)
    lacks, or whose value its rule refuses. ``required`` says why a missing key is needed (``{section}`` is filled
    in); None: only the keys present are checked."""
    for key, rule in rules.items():
        if key not in values:
            if required is None:
                continue
            raise ConfigError(f"{section}.{key}: missing; {required.format(section=section)}")
        problem = rule(values[key], values)
        if problem is not None:
            raise ConfigError(f"{section}.{key}={format_value(values[key])}: {problem}")


def check_known(section: str, values: Mapping[str, Any], known: Collection[str], problem: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``values`` not in ``known`` (``problem`` says what it is not);
    instantiate's own keys (``_target_``, ...) are always known."""
    for key, value in values.items():
        if key not in known and key not in HYDRA_KEYS:
            guess = closest_key(f"{section}.{key}", [f"{section}.{name}" for name in known])
            raise ConfigError(f"{section}.{key}={format_value(value)}: {problem}{guess}")


def positive_int(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_int(value) and value >= 1 else "must be a positive integer"


def non_negative_int(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_int(value) and value >= 0 else "must be an integer >= 0"


def positive_number(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_number(value) and value > 0 else "must be a number > 0"


def non_negative_number(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_number(value) and value >= 0 else "must be a number >= 0"


def seed_value(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """A random seed as numpy and scikit-learn take it."""
    return None if is_int(value) and 0 <= value < 2**32 else "must be an integer in [0, 2**32)"


def number_in(low: float, high: float, *, high_open: bool = False) -> Rule:
    def check(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        inside = is_number(value) and low <= value and (value < high if high_open else value <= high)
        return None if inside else f"must be a number in [{low}, {high}{')' if high_open else ']'}"

    return check


def boolean(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false"


def auto_or_boolean(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if value == "auto" or isinstance(value, bool) else "must be auto, true or false"


def share(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """A share of something whole: a number in (0, 1]."""
    return None if is_number(value) and 0 < value <= 1 else "must be a number in (0, 1]"


def text(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def texts(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    return None if ok else "must be a list of non-empty strings"


def one_of(*allowed: str) -> Rule:
    def check(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        if value in allowed:
            return None
        hint = closest(value, [a for a in allowed if a]) if isinstance(value, str) else ""  # moe.router=token_choice
        return f"must be one of {', '.join(a if a else repr(a) for a in allowed)}{hint}"

    return check


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""

    def check(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        problem = None if value is None else rule(value, cfg)
        return None if problem is None else f"{problem}, or null"

    return check


def format_value(value: Any) -> str:
    """A value as the user would type it in a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):  # an empty element as typed (logger.tags=['']), not as nothing
        return "[" + ",".join("''" if element == "" else format_value(element) for element in value) + "]"
    return str(value)


def counted(number: int, noun: str, plural: Optional[str] = None) -> str:
    """``number`` and ``noun`` as a message says them: ``1 replica``, ``2 replicas`` (``plural``, when not noun + s)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def closest(word: str, candidates: Sequence[str]) -> str:
    """``; did you mean <closest>?``, or nothing when no candidate is close."""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def closest_key(key: str, keys: Sequence[str]) -> str:
    """:func:`closest` among the keys of the same section, by their last part; a key the typed one begins (or that
    begins it) first: ``model.patch`` -> ``model.patch_size``."""
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    prefixed = sorted(name for name in siblings if leaf and (name.startswith(leaf) or leaf.startswith(name)))
    if prefixed:
        return f"; did you mean {siblings[prefixed[0]]}?"
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.75)
    return f"; did you mean {siblings[match[0]]}?" if match else ""


def import_target(target: Any) -> Optional[Callable]:
    """The class or function a ``_target_`` names, or None where it names none importable; without the three lines
    Hydra's ``get_object`` logs before it raises."""
    from hydra.utils import get_object

    hydra_log = logging.getLogger("hydra.utils")
    was_disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(str(target))
    except Exception:
        return None
    finally:
        hydra_log.disabled = was_disabled
