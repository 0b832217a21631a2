"""Export rules: how a method's state becomes modules in ``materialize``.

A state struct that implements ``export_rule()`` (``purecomp.protocol``) returns an
``ExportRule``. ``materialize`` runs every rule's phases in this order, each phase over all
rules before the next:

1. ``restructure``: change the model's structure (filter pruning removes channels and records
   the kept indices in ``context.kept``; later phases slice what they hold accordingly);
2. ``encode_weights``: store weights in export form (integers behind ``Dequantize``) and mark
   in ``context.encoded`` whether a BatchNorm after the layer may fold into the integers;
3. (the core folds BatchNorm into the conv / linear before it, recording moved site keys in
   ``context.remap``);
4. ``site_modules``: the export modules of the activation transforms, by site key, in
   ``context.modules``; every key of ``method.sites(state)`` a rule handles goes into
   ``context.handled`` (a site no rule handles cannot be exported);
5. ``finish``: rewrites that need every site module (grouped linears, quantized embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from purecomp.graph import ModelGraph


@dataclasses.dataclass
class ExportContext:
    """What the phases share. ``model`` is the copy being rewritten (the user's is untouched);
    ``params`` are the transformed params (weights after every weight transform)."""

    model: nn.Module
    graph: ModelGraph | None
    params: dict[str, Tensor]
    sites: dict[str, Any]
    kept: dict[str, dict[int, Tensor]] = dataclasses.field(default_factory=dict)
    encoded: dict[str, bool] = dataclasses.field(default_factory=dict)
    remap: dict[str, str] = dataclasses.field(default_factory=dict)
    modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    handled: set[str] = dataclasses.field(default_factory=set)

    def add_site_module(self, key: str, module: nn.Module) -> None:
        """Put ``module`` at site ``key``; a module already there (an earlier chain member's
        transform at the same key) runs first: ``nn.Sequential(earlier, module)``."""
        earlier = self.modules.get(key)
        self.modules[key] = module if earlier is None else nn.Sequential(earlier, module)


class ExportRule:
    """Base class of export rules; every phase does nothing unless overridden."""

    def restructure(self, context: ExportContext) -> None:
        """Phase 1: structural changes of ``context.model``."""

    def encode_weights(self, context: ExportContext) -> None:
        """Phase 2: weights in export form; ``context.encoded[name] = may_fold_batchnorm``."""

    def site_modules(self, context: ExportContext) -> None:
        """Phase 4: ``context.modules[key] = module`` for the activation transforms."""

    def finish(self, context: ExportContext) -> None:
        """Phase 5: rewrites that need every site module in place."""
