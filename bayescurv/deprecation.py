"""Deprecation shims for renamed or retired arguments (listed in the changelog)."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

T = TypeVar("T")
UNSET: Any = object()
"""Default of a renamed argument's old name: tells "not passed" from any value."""


def renamed(new_value: T, old_value: Any, new: str, old: str, where: str,
            stacklevel: int = 3) -> T:
    """The value of a renamed argument: ``old_value`` (with a ``FutureWarning``) when the
    old name was passed, else ``new_value``."""
    if old_value is UNSET:
        return new_value
    warnings.warn(f"{where}: {old}= is deprecated, use {new}=", FutureWarning,
                  stacklevel=stacklevel)
    return old_value


__all__ = ["renamed", "UNSET"]
