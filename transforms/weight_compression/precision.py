"""Which precision each weight gets: NNCF 3.x's ``WeightCompression`` selection, step by step.

Input: the weighted layers (linears and embeddings) in execution order. Following
``get_weight_compression_parameters`` and ``apply`` of NNCF v3.1.0
(``nncf/quantization/algorithms/weight_compression/algorithm.py``):

1. A weight read by several layers (tied embeddings and LM head) is taken once, at its first
   layer; ignored layers are kept in float. Every other weight starts in the backup precision
   (``int8_asym`` / ``int8_sym`` per output channel, or float for ``backup_mode="none"``).
2. The ratio-defining weights, those that may go to the primary precision: every weight for the
   INT8 modes; otherwise the linears without the LAST one (the LM head; kept when the last layer
   was already skipped, e.g. tied to the embedding, or ignored), plus the embeddings when
   ``all_layers=True`` (which also keeps the last linear).
3. Group-size fallback (``error``, ``ignore``, ``adjust``) on the ratio-defining weights, then
   all of them get the primary precision (``mode`` with ``group_size``).
4. With ``ratio < 1``: sort them by sensitivity score, ascending, and move to the primary set
   while ``(weights already primary + this one) / all ratio-defining weights < ratio``,
   counting ELEMENTS, stopping at the first that would reach ``ratio``
   (``MixedPrecisionCriterion.apply``). The rest go back to the backup precision.
5. ``error`` fallback: any weight still primary whose input channels the group size does not
   divide raises ``ConfigError`` naming them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from purecomp.errors import ConfigError

from .parameters import Settings


@dataclasses.dataclass(frozen=True)
class Layer:
    """One weighted op: its ``weight`` (param name), ``kind`` (``linear`` / ``embedding``), the
    ``module`` running it, the weight's ``shape`` ``[out, in]`` (embeddings: ``[vocab, dim]``,
    grouped along ``dim``), whether it is ``ignored``, and its graph ``site`` when traced."""

    weight: str
    kind: str
    module: str
    shape: tuple[int, int]
    ignored: bool = False
    site: str = ""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """``mode`` and ``group_size`` (-1: one group per output channel) of one weight."""

    mode: str
    group_size: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """``configs``: weight -> ``LayerConfig`` (``None``: float) for every compressible weight;
    ``layers``: weight -> its first ``Layer``; ``ratio_defining`` weights; ``skipped``: weights
    kept in float because they are ignored or cannot take the group size (``ignore`` fallback)."""

    configs: dict[str, LayerConfig | None]
    layers: dict[str, Layer]
    ratio_defining: tuple[str, ...]
    skipped: dict[str, Layer]


def backup_config(settings: Settings) -> LayerConfig | None:
    """The backup precision (NNCF's ``_get_backup_config``): per output channel, or ``None``."""
    if settings.backup_mode == "none":
        return None
    return LayerConfig("int8_sym" if settings.backup_mode == "int8_sym" else "int8_asym", -1)


def candidates(layers: Sequence[Layer], settings: Settings) -> tuple[list[Layer], list[Layer], list[Layer]]:
    """``(all compressible, ratio-defining, skipped)`` layers, one per weight (steps 1 and 2)."""
    compressible: list[Layer] = []
    skipped: list[Layer] = []
    seen: set[str] = set()
    last_skipped = False
    for i, layer in enumerate(layers):
        is_last = i == len(layers) - 1
        if layer.weight in seen:
            last_skipped = is_last
            continue
        if layer.ignored:
            last_skipped = is_last
            skipped.append(layer)
            continue
        compressible.append(layer)
        seen.add(layer.weight)
    if settings.is_int8:
        return compressible, list(compressible), skipped
    ratio_defining = [layer for layer in compressible if layer.kind == "linear"]
    if not settings.all_layers and not last_skipped:
        ratio_defining = ratio_defining[:-1]
    if settings.all_layers:
        ratio_defining += [layer for layer in compressible if layer.kind == "embedding"]
    return compressible, ratio_defining, skipped


def select_primary(ratio_defining: Sequence[Layer], scores: Sequence[float], ratio: float) -> list[Layer]:
    """Step 4: the layers that go to the primary precision (lowest scores first)."""
    total = sum(layer.numel for layer in ratio_defining)
    chosen: list[Layer] = []
    in_primary = 0
    for index in sorted(range(len(ratio_defining)), key=lambda i: scores[i]):
        layer = ratio_defining[index]
        if (in_primary + layer.numel) / total >= ratio:
            break
        chosen.append(layer)
        in_primary += layer.numel
    return chosen


def plan(layers: Sequence[Layer], settings: Settings,
         scores: Callable[[list[Layer]], list[float]] | None = None) -> Plan:
    """Steps 1 to 5 (module docstring). ``scores(ratio_defining)`` gives the sensitivity of each
    ratio-defining layer; it is called only when ``ratio < 1``."""
    compressible, ratio_defining, skipped = candidates(layers, settings)
    backup = backup_config(settings)
    configs: dict[str, LayerConfig | None] = {layer.weight: backup for layer in compressible}
    group_sizes = {layer.weight: settings.group_size for layer in ratio_defining}
    fallback = settings.advanced.group_size_fallback_mode
    if settings.group_size != -1 and fallback in ("ignore", "adjust"):
        kept = []
        for layer in ratio_defining:
            channels = layer.shape[1]
            if channels % settings.group_size == 0:
                kept.append(layer)
            elif fallback == "ignore":
                skipped.append(layer)
                del configs[layer.weight]
            else:
                adjusted = channels & -channels  # the largest power of two dividing the channels
                if adjusted >= settings.advanced.min_adjusted_group_size:
                    group_sizes[layer.weight] = adjusted
                    kept.append(layer)
        if fallback == "ignore":
            compressible = [layer for layer in compressible if layer.weight in configs]
        ratio_defining = kept
    for layer in ratio_defining:
        configs[layer.weight] = LayerConfig(settings.mode, group_sizes[layer.weight])
    if settings.ratio < 1 and ratio_defining:
        if scores is None:
            raise ConfigError("ratio", "ratio < 1 needs layer sensitivities, and no scorer was given")
        values = scores(list(ratio_defining))
        primary = {layer.weight for layer in select_primary(ratio_defining, values, settings.ratio)}
        for layer in ratio_defining:
            if layer.weight not in primary:
                configs[layer.weight] = backup
    failed = [(layer.module or layer.weight, layer.shape[1]) for layer in ratio_defining
              if (c := configs[layer.weight]) is not None and c.group_size != -1 and layer.shape[1] % c.group_size]
    if failed:
        listed = ", ".join(f"{name} ({channels} input channels)" for name, channels in failed[:8])
        raise ConfigError("group_size", f"group size {settings.group_size} does not divide the input channels of "
                          f"{len(failed)} layer(s): {listed}{' ...' if len(failed) > 8 else ''}; expected a divisor of "
                          "every 4-bit layer's input channels, or advanced_parameters="
                          "{'group_size_fallback_mode': 'adjust' | 'ignore'}")
    return Plan(configs, {layer.weight: layer for layer in compressible},
                tuple(layer.weight for layer in ratio_defining), {layer.weight: layer for layer in skipped})
