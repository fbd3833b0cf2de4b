"""Rules for the values of timm ``VisionTransformer`` arguments a config adds with ``+model.<argument>=...``,
read from the constructor's signature, so that a bad value is one line before any data loads rather than timm's
assert, or a number that crashes inside the token count, once the model is built.

``+model.reg_tokens=abc`` crashed inside the config check itself; ``-1`` was torch's "negative dimension";
``+model.weight_init=bogus`` and ``+model.pos_embed=bogus`` were timm's bare asserts; ``+model.drop_rate=2`` was
torch's dropout error; ``+model.qkv_bias=maybe`` was taken as true.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Mapping, Optional

from timm.models.vision_transformer import VisionTransformer

from .rules import (
    Rule,
    boolean,
    non_negative_int,
    number_in,
    one_of,
    optional,
    positive_number,
)

# Arguments whose allowed values the signature does not spell out (a plain str or float).
BY_NAME: dict[str, Rule] = {
    "pos_embed": one_of("learn", "none", ""),  # timm: assert pos_embed in ('', 'none', 'learn')
    "init_values": optional(positive_number),  # LayerScale's initial gain
}


def rule_for(name: str, annotation: Any) -> Optional[Rule]:
    """The rule for one argument from its annotation, or None where the signature says too little."""
    if name in BY_NAME:
        return BY_NAME[name]
    if annotation is bool:
        return boolean
    if annotation == Optional[bool]:
        return optional(boolean)
    if annotation is int:
        return non_negative_int  # reg_tokens, the one int left besides those MODEL_RULES checks
    if annotation is float and name.endswith("_rate"):
        return number_in(0, 1, high_open=True)  # dropout and drop-path probabilities
    if typing.get_origin(annotation) is typing.Literal:
        return one_of(*typing.get_args(annotation))
    return None


def vit_argument_rules(arguments: set[str], checked: Mapping[str, Rule]) -> dict[str, Rule]:
    """Rules for ``arguments`` (VisionTransformer's) that ``checked`` (MODEL_RULES) does not cover already."""
    parameters = inspect.signature(VisionTransformer.__init__).parameters
    rules = {name: rule_for(name, parameters[name].annotation) for name in sorted(arguments - set(checked))}
    return {name: rule for name, rule in rules.items() if rule is not None}
