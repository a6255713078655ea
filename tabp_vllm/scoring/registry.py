"""The one list of scoring methods: name -> class. The CLI, the compare bench, `result_for_k` and
the tests read it; a new method is one class in its family's file and one line here.

Classes are imported on first use (as vLLM's model registry does): listing the names costs no torch
import, so `tabp-vllm --help` stays fast.
"""

from __future__ import annotations

import importlib
from functools import cache

from tabp_vllm.errors import TabpError
from tabp_vllm.scoring.base import ScoringMethod

_CLASSES: dict[str, tuple[str, str]] = {
    "tabp": ("tabp", "TaBP"),
    "block_influence": ("similarity", "BlockInfluence"),
    "angular": ("similarity", "Angular"),
    "what_matters": ("similarity", "WhatMatters"),
    "sleb": ("perplexity", "SLEB"),
    "ppl": ("perplexity", "PPLSensitivity"),
    "sleb-task": ("perplexity", "SLEBTask"),
    "ppl-task": ("perplexity", "PPLSensitivityTask"),
    "random": ("floors", "RandomBlocks"),
    "last_k": ("floors", "LastK"),
}

METHOD_NAMES: tuple[str, ...] = tuple(_CLASSES)


@cache
def get_method(name: str) -> ScoringMethod:
    """The method registered as `name`; one error line naming the choices if there is none."""
    if name not in _CLASSES:
        raise TabpError(f"unknown method {name!r}: choose from {', '.join(METHOD_NAMES)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f"tabp_vllm.scoring.{module}"), cls)()


def all_methods() -> dict[str, ScoringMethod]:
    return {n: get_method(n) for n in METHOD_NAMES}
