"""HuggingFace encoders (BERT, DistilBERT, RoBERTa families): placement, tracing, state files, export.

Placement. ``TRANSFORMER_TARGET_SCOPES`` keeps a quantizer only where it feeds a
``linear``, ``matmul`` or ``embedding`` call site, so with eager attention an encoder gets:

- a weight quantizer on every linear weight and every embedding table (lookups are not
  re-quantized: the rows of a quantized table are already on its grid);
- an activation quantizer on the input of every linear (layer-norm outputs, GELU outputs,
  the attention context) and on both inputs of the two attention matmuls: ``Q K^T``
  (query and key) and ``softmax(.) V`` (attention probabilities and value);
- nothing on integer inputs (token ids, masks), on the additive attention mask, on the
  residual adds, or inside softmax / layer norm. Passing ``target_scopes`` yourself
  (a config key) replaces this rule.

A quantizer sits on the tensor, so every consumer of a quantized tensor reads the quantized
value (the residual branch that reads a layer-norm output too); this is what the exported
QDQ graph computes. ``scaled_dot_product_attention`` hides the two matmuls in one op, so
``use_eager_attention`` switches the model to HuggingFace's ``"eager"`` attention, which
calls ``torch.matmul`` twice (a supported config option, not a patch).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from purecomp.api import CompressedModule, CompressionController, Config
from purecomp.checkpoint import load_record, save_record
from purecomp.compression import Compression
from purecomp.errors import CalibrationError, ConfigError, ScopeError, StateError
from purecomp.graph import ModelGraph, trace
from purecomp.init_context import InitContext
from purecomp.scopes import scope_matches
from purecomp.transforms.quantize import QuantizationState, RangeInit
from purecomp.transforms.quantize.grouped_method import grouped_activations

log = logging.getLogger(__name__)

TRANSFORMER_TARGET_SCOPES: tuple[str, ...] = (r"{re}(.+/)?(linear|matmul|embedding)#\d+",)
# the two linears of each feed-forward block (BERT / RoBERTa: intermediate.dense, output.dense;
# DistilBERT: ffn.lin1, ffn.lin2); their inputs carry BERT's outlier channels
FFN_SCOPES: tuple[str, ...] = (
    r"{re}(.+\.)?layer\.\d+\.(intermediate|output)\.dense/linear#\d+",
    r"{re}(.+\.)?ffn\.lin[12]/linear#\d+",
)
# every linear reading an outlier-carrying tensor: Q, K, V (the previous layer's output LayerNorm),
# and the two feed-forward linears (attention-output LayerNorm, GELU output); not the attention
# output projection, whose input (the attention context) has no outlier channels
GROUPED_SCOPES: tuple[str, ...] = FFN_SCOPES + (
    r"{re}(.+\.)?layer\.\d+\.attention\.self\.(query|key|value)/linear#\d+",
    r"{re}(.+\.)?attention\.(q_lin|k_lin|v_lin)/linear#\d+",
)
NUM_GROUPS = 4
LABEL_KEYS = frozenset({"labels", "label", "label_ids"})
STATE_FILE = "compression_state.safetensors"


def use_eager_attention(model: nn.Module) -> nn.Module:
    """Switch a ``PreTrainedModel`` to ``attn_implementation="eager"`` (in place; returns it).

    Eager attention computes ``softmax(Q K^T * scale + mask) V`` with two ``torch.matmul``
    calls that purecomp can quantize; SDPA fuses them into one op.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ConfigError("model", f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    current = config._attn_implementation
    if current == "eager":
        return model
    if not hasattr(model, "set_attn_implementation"):
        raise ConfigError("model", f"attention is {current!r} and this transformers version cannot switch it "
                                   "after loading; load the model with attn_implementation='eager'")
    log.info("switching %s to eager attention (was %r)", type(model).__name__, current)
    model.set_attn_implementation("eager")
    return model


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword inputs of a tokenized batch: every entry but the labels."""
    if not isinstance(batch, Mapping):
        raise CalibrationError(
            f"expected a tokenized batch (a mapping such as {{'input_ids': ..., 'attention_mask': ...}}), "
            f"got {type(batch).__name__}"
        )
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


def trace_transformer(model: nn.Module, batch: Mapping[str, Any]) -> ModelGraph:
    """``purecomp.trace`` on a tokenized batch (labels dropped), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return trace(model, (), model_inputs(batch))
    finally:
        model.train(was_training)


@dataclasses.dataclass(frozen=True)
class ActivationOptions:
    """Where activations leave the plain per-tensor INT8 of the config: inputs of the linears in
    ``float_scopes`` stay float (``float_activations``); inputs of the linears in
    ``grouped_scopes`` get per-embedding-group quantizers with up to ``num_groups`` groups
    (``grouped_activations``). Saved with the compression state, so a load rebuilds the same
    method."""

    float_scopes: tuple[str, ...] = ()
    grouped_scopes: tuple[str, ...] = ()
    num_groups: int = NUM_GROUPS

    def apply(self, method: Compression, range_samples: int) -> Compression:
        """``method`` with the grouped quantizers (``min_max`` ranges on ``range_samples``
        calibration samples), then the float inputs."""
        if self.grouped_scopes:
            method = grouped_activations(method, self.grouped_scopes, self.num_groups,
                                         RangeInit(type="min_max", num_init_samples=range_samples))
        return float_activations(method, self.float_scopes) if self.float_scopes else method

    def as_json(self) -> str:
        return json.dumps({"float_scopes": list(self.float_scopes), "grouped_scopes": list(self.grouped_scopes),
                           "num_groups": self.num_groups})

    @classmethod
    def from_json(cls, text: str) -> ActivationOptions:
        raw = json.loads(text)
        return cls(tuple(raw["float_scopes"]), tuple(raw["grouped_scopes"]), int(raw["num_groups"]))


def transformer_quantization(
    float_activation_scopes: Sequence[str] = (),
    grouped_activation_scopes: Sequence[str] = (),
    num_groups: int = NUM_GROUPS,
    **kwargs: Any,
) -> Compression:
    """``purecomp.quantization(**kwargs)`` with ``target_scopes=TRANSFORMER_TARGET_SCOPES`` unless
    given; ``float_activation_scopes``: see ``float_activations``.

    ``grouped_activation_scopes`` (e.g. ``GROUPED_SCOPES``): the inputs of these linears get
    per-embedding-group quantizers with up to ``num_groups`` groups (``grouped_activations``),
    ranges ``min_max`` over the same number of calibration samples as ``range_init``."""
    from purecomp.transforms.quantize import quantization

    kwargs.setdefault("target_scopes", TRANSFORMER_TARGET_SCOPES)
    options = ActivationOptions(tuple(float_activation_scopes), tuple(grouped_activation_scopes), num_groups)
    return options.apply(quantization(**kwargs), (kwargs.get("range_init") or RangeInit()).num_init_samples)


def float_activations(method: Compression, scopes: Sequence[str]) -> Compression:
    """``method`` whose ``init`` drops every activation quantizer all of whose consumers match
    ``scopes`` (weights stay quantized: those linears run weight-only INT8, on float inputs).

    ``FFN_SCOPES`` keeps BERT's feed-forward inputs in float: the tensors where BERT's outlier
    channels live (Bondarenko et al., 2021). Raises ``ScopeError`` when no pattern matches any site
    (patterns for other model families may match nothing).
    """
    patterns = tuple(scopes)

    def keep(graph: ModelGraph, consumers: Sequence[str]) -> bool:
        return not all(any(scope_matches(p, graph.node(c)) for p in patterns) for c in consumers if c != "output")

    def filtered(graph: ModelGraph, state: Any) -> Any:
        if isinstance(state, QuantizationState):
            acts = {k: q for k, q in state.activations.items() if keep(graph, state.consumers_of(k))}
            dropped = sorted(set(state.activations) - set(acts))
            log.info("float activations (%d): %s", len(dropped), dropped)
            return dataclasses.replace(state, activations=acts,
                                       consumers=tuple(c for c in state.consumers if c[0] in acts))
        if isinstance(state, tuple):
            return tuple(filtered(graph, s) for s in state)
        return state

    def init(context: InitContext) -> Any:
        graph = context.graph
        if not any(scope_matches(p, node) for p in patterns for node in graph):
            raise ScopeError("float_activation_scopes", f"{list(patterns)} match no site of the model; expected "
                             "patterns of linear sites (FFN_SCOPES covers BERT, RoBERTa and DistilBERT)")
        return filtered(graph, method.init(context))

    return method._replace(init=init)


def transformer_config(config: Config | Mapping[str, Any]) -> Config:
    """A copy of ``config`` whose quantization sections without ``target_scopes`` get
    ``TRANSFORMER_TARGET_SCOPES`` (idempotent; other algorithms are unchanged)."""
    data = copy.deepcopy({k: v for k, v in dict(config).items() if k != "__init_args__"})
    if "compression" not in data:
        raise ConfigError("compression", "missing; expected an algorithm section or a list of them")
    sections = data["compression"] if isinstance(data["compression"], list) else [data["compression"]]
    for section in sections:
        if isinstance(section, dict) and section.get("algorithm") == "quantization":
            section.setdefault("target_scopes", list(TRANSFORMER_TARGET_SCOPES))
    return Config.from_dict(data)


def create_compressed_transformer(
    model: nn.Module,
    config: Config | Mapping[str, Any],
    example_batch: Mapping[str, Any],
    data: Iterable[Any] | None = None,
    compression_state: Mapping[str, Any] | None = None,
    *,
    eager_attention: bool = True,
    float_activation_scopes: Sequence[str] = (),
    grouped_activation_scopes: Sequence[str] = (),
    num_groups: int = NUM_GROUPS,
) -> tuple[TransformerController, CompressedModule]:
    """``create_compressed_model`` for a HuggingFace model, traced on ``example_batch``.

    The config gets the transformer placement (``transformer_config``). With ``data``
    (tokenized batches) the state is initialized (range init...); with ``compression_state``
    (``get_compression_state()`` / ``read_compression_state``) it is restored instead.
    ``float_activation_scopes`` (e.g. ``FFN_SCOPES``) and ``grouped_activation_scopes`` (e.g.
    ``GROUPED_SCOPES``, with ``num_groups``): see ``ActivationOptions``. The returned
    ``TransformerController`` records them for ``save_compression_state``.
    """
    if eager_attention:
        use_eager_attention(model)
    config = transformer_config(config)
    options = ActivationOptions(tuple(float_activation_scopes), tuple(grouped_activation_scopes), num_groups)
    method = options.apply(config.compression_config().method(), _range_samples(config))
    graph = trace_transformer(model, example_batch)
    module = CompressedModule(model, method)
    ctrl = TransformerController(config, method, graph, module, options)
    if compression_state is not None:
        ctrl.load_compression_state(compression_state)
    elif data is not None:
        ctrl.initialize(data)
    return ctrl, module


class TransformerController(CompressionController):
    """The controller of ``create_compressed_transformer``: it also holds the ``ActivationOptions``
    its method was built with, which ``save_compression_state`` writes next to the state."""

    def __init__(self, config: Config, method: Compression, graph: ModelGraph, module: CompressedModule,
                 activation_options: ActivationOptions) -> None:
        super().__init__(config, method, graph, module)
        self.activation_options = activation_options


def _range_samples(config: Config) -> int:
    """``num_init_samples`` of the config's quantization range init (RangeInit's default if unset)."""
    sections = config.get("compression", [])
    for section in sections if isinstance(sections, list) else [sections]:
        if section.get("algorithm") == "quantization":
            return int(section.get("initializer", {}).get("range", {}).get("num_init_samples",
                                                                           RangeInit().num_init_samples))
    return RangeInit().num_init_samples


# ---------------------------------------------------------------- compression state files


def save_compression_state(ctrl: CompressionController, path: str | Path, example_batch: Mapping[str, Any]) -> Path:
    """Write ``ctrl.get_compression_state()``, the tracing batch and the activation options to one
    file (``purecomp.checkpoint.save_record``)."""
    example = {name: value for name, value in model_inputs(example_batch).items() if isinstance(value, Tensor)}
    options = ctrl.activation_options if isinstance(ctrl, TransformerController) else ActivationOptions()
    return save_record(path, ctrl.get_compression_state(), example, {"activation_options": options.as_json()})


def read_compression_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(compression_state, example_batch)`` from a ``save_compression_state`` file."""
    saved, example, extras = load_record(path)
    missing = {"version", "config", "signature", "scheduler", "structure"} - set(saved)
    if missing:
        raise StateError(f"{str(path)!r} is not a purecomp transformers state: missing {sorted(missing)}")
    # files written before the options were saved hold the plain method
    saved["activation_options"] = ActivationOptions.from_json(extras.get("activation_options",
                                                                         ActivationOptions().as_json()))
    return saved, example


def load_compressed_transformer(
    model: nn.Module, path: str | Path, *, eager_attention: bool = True
) -> tuple[CompressionController, CompressedModule]:
    """Rebuild ``(controller, module)`` around ``model`` (weights already loaded, e.g. with
    ``from_pretrained``) from a ``save_compression_state`` file (a directory means its ``STATE_FILE``)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    saved, example = read_compression_state(path)
    device = next(model.parameters()).device
    example = {k: v.to(device) for k, v in example.items()}
    config = Config.from_dict(json.loads(saved["config"]))
    options: ActivationOptions = saved["activation_options"]
    return create_compressed_transformer(model, config, example, compression_state=saved,
                                         eager_attention=eager_attention, float_activation_scopes=options.float_scopes,
                                         grouped_activation_scopes=options.grouped_scopes, num_groups=options.num_groups)


# ---------------------------------------------------------------- export


def positional_inputs(model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, ...]:
    """The batch's tensors in the order of ``model.forward``'s leading parameters (ONNX inputs are positional)."""
    inputs = model_inputs(batch)
    names = list(inspect.signature(model.forward).parameters)
    leading = names[: len(inputs)]
    if set(leading) != set(inputs):
        raise ConfigError(
            "example_batch",
            f"ONNX export passes inputs by position; {sorted(inputs)} must be the first parameters of "
            f"{type(model).__name__}.forward, which are {leading}",
        )
    return tuple(inputs[name] for name in leading)


def export_onnx(ctrl: CompressionController, path: str | Path, example_batch: Mapping[str, Any]) -> Path:
    """``ctrl.export_model`` with the batch's inputs in ``forward`` order (dynamic batch)."""
    model = ctrl.module.model
    return ctrl.export_model(path, positional_inputs(model, example_batch))


def batches_on(data: Iterable[Mapping[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    """Tokenized batches moved to ``device``, labels dropped."""
    for batch in data:
        yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in model_inputs(batch).items()}
