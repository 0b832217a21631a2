"""Assertions several test files share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

import purecomp as pc
from purecomp.errors import ConfigError


def assert_config_error(cfg: Mapping[str, Any], call: Mapping[str, Any] | None, path: str, message: str) -> None:
    """Loading ``cfg`` and building its method with ``call`` raises ``ConfigError`` at ``path``
    whose text contains ``message``."""
    with pytest.raises(ConfigError) as info:
        pc.load_config(cfg).method(**(call or {}))
    assert info.value.path == path
    assert message in str(info.value)
