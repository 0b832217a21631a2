"""How a ``FilterPruningState`` becomes a smaller model (``purecomp.export.rules``): pruned
channels are removed physically (``purecomp.export.pruning.prune_channels``) and the kept
indices recorded, so the weight encodings that follow slice their per-channel grids."""

from __future__ import annotations

import dataclasses
from typing import Any

from purecomp.errors import StateError
from purecomp.export.pruning import prune_channels
from purecomp.export.rules import ExportContext, ExportRule


@dataclasses.dataclass(frozen=True)
class FilterPruningExport(ExportRule):
    state: Any  # FilterPruningState

    def restructure(self, context: ExportContext) -> None:
        if context.kept:
            raise StateError("materialize supports one filter pruning method in a chain; found more")
        kept = prune_channels(context.model, self.state)
        current = dict(context.model.named_parameters())
        context.params.update({name: current[name] for name in kept if name in current})
        context.kept.update(kept)
