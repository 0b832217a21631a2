"""Hardware settings for mixed precision: the bit widths and assignment modes each target supports.

The table lives in ``hardware.json`` (package data). A ``bits`` list given by the user overrides
the target's bit widths; the assignment mode must be one the target supports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

from purecomp.errors import ConfigError

MODES = ("strict", "liberal")


@dataclasses.dataclass(frozen=True)
class HardwareSetting:
    """Allowed bit widths (ascending) and assignment modes of one target device."""

    device: str
    bits: tuple[int, ...]
    modes: tuple[str, ...]


@cache
def hardware_table() -> dict[str, HardwareSetting]:
    """``{device: HardwareSetting}`` read from ``hardware.json``."""
    raw = json.loads(resources.files(__package__).joinpath("hardware.json").read_text())
    return {
        device: HardwareSetting(device, tuple(sorted(entry["bits"])), tuple(entry["modes"]))
        for device, entry in raw.items()
    }


def hardware_setting(
    device: str = "ANY",
    bits: Sequence[int] | None = None,
    mode: str = "strict",
    origin: str = "",
    device_path: str = "target_device",
) -> HardwareSetting:
    """The setting of ``device`` with ``bits`` overriding its bit widths; ``mode`` must be supported.

    Raises ``ConfigError`` naming ``device_path`` or ``{origin}bits`` / ``{origin}bitwidth_assignment_mode``."""
    table = hardware_table()
    if device not in table:
        if bits is None:
            raise ConfigError(device_path, f"{device!r} has no mixed-precision hardware setting; expected one of "
                                           f"{sorted(table)}, or give {origin}bits")
        base = HardwareSetting(device, (), MODES)
    else:
        base = table[device]
    if bits is not None:
        chosen = tuple(sorted(set(int(b) for b in bits)))
        if not chosen or any(not 2 <= b <= 8 for b in chosen):
            raise ConfigError(f"{origin}bits", f"expected a non-empty list of bit widths in [2, 8], got {list(bits)}")
        base = dataclasses.replace(base, bits=chosen)
    if mode not in MODES:
        raise ConfigError(f"{origin}bitwidth_assignment_mode", f"expected one of {list(MODES)}, got {mode!r}")
    if mode not in base.modes:
        raise ConfigError(f"{origin}bitwidth_assignment_mode",
                          f"target device {device!r} supports only {list(base.modes)}, got {mode!r}")
    return base
