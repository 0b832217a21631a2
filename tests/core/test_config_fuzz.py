"""Config fuzzing: configs drawn from the registered schemas, valid ones built and trained, and
mutations of them, for every algorithm and for chains.

The strategies are derived at run time from ``purecomp.registry.schema()`` and each
``ALGORITHMS[name].schema``, so they follow the schemas as they change. Properties:

- ``test_schema_valid_configs_build_or_raise_a_purecomp_error``: any document the schemas
  accept either builds and trains through the front door, or raises a ``PurecompError``; a
  ``ConfigError`` names a JSON path into the document. No KeyError / TypeError /
  AttributeError / IndexError / ValueError / RuntimeError escapes.
- ``test_valid_configs_build_and_train``: configs drawn with the semantic hints below (levels
  in range, scopes that match, settings that go together) always build, initialize, train a
  step and step the schedules.
- the mutation tests: a wrong type, an unknown key, an out-of-range number, an empty list or a
  scope matching nothing, put anywhere in a valid config, raises ``ConfigError`` whose ``.path``
  is the mutated path (or the object holding it).
- contradictory stacks: each raises a ``ConfigError`` naming the section, or has the tested
  behaviour documented in docs/reliability.md.

The quick runs use ``max_examples=QUICK``; the ``slow`` ones ``SLOW``. docs/reliability.md
reports the counts.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from torch import nn

import purecomp as pc
from purecomp.config import json_path
from purecomp.errors import ConfigError, PurecompError, ScopeError
from purecomp.registry import ALGORITHMS
from purecomp.registry import schema as registered_schema

QUICK, SLOW = 25, 300  # examples per property (counted in docs/reliability.md)
ALL = ("quantization", "magnitude_sparsity", "rb_sparsity", "const_sparsity", "filter_pruning", "binarization")


def fuzz_settings(n: int) -> settings:
    # no shrinking: a failure prints the drawn config (``note``), and shrinking a model-level test takes minutes
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------ the model


class Net(nn.Module):
    """Three convolutions (BatchNorm, a residual add), a linear head: every method has sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


INPUT = [2, 1, 8, 8]
SCOPES_THAT_MATCH = ["conv1", "conv2", "conv3", "fc", "{re}conv[23]", "{re}^fc", "conv2/conv2d#0"]
SCOPES_THAT_MATCH_NOTHING = ["nothing_here", "{re}^zzz$", "Net/NNCFConv2d[conv9]/conv2d_0"]


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(*INPUT, generator=gen), torch.randint(0, 3, (INPUT[0],), generator=gen)) for _ in range(n)]


def train(config: Mapping[str, Any], steps: int = 2) -> pc.CompressionController:
    """The front door: load, wrap, initialize, train ``steps`` steps over two epochs, statistics."""
    torch.manual_seed(0)
    model = Net()
    cfg = pc.Config.from_dict(config)
    data = batches()
    pc.register_default_init_args(cfg, data, nn.functional.cross_entropy,
                                  autoq_eval_fn=lambda apply, loader: 0.5, val_loader=data[:1])
    ctrl, module = pc.create_compressed_model(model, cfg)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    for epoch in range(2):
        ctrl.scheduler.epoch_step()
        for x, y in data[:steps]:
            ctrl.scheduler.step()
            loss = nn.functional.cross_entropy(module(x), y) + ctrl.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss), (epoch, loss)
    ctrl.statistics()
    ctrl.compression_stage()
    return ctrl


# ------------------------------------------------------------------------------------ schema -> strategy

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, -1.5]),
                         st.sampled_from(["", "x", "conv1"]))


def resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    while isinstance(node, Mapping) and "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def validates(instance: Any, node: Mapping[str, Any], defs: Mapping[str, Any]) -> bool:
    return jsonschema.Draft202012Validator({**node, "$defs": defs}).is_valid(instance)


def bounds(node: Mapping[str, Any], integer: bool, span: float) -> tuple[float, float, bool, bool]:
    """``(low, high, low_open, high_open)``; an unbounded side is ``span`` away from the other."""
    lo, lo_open = node.get("minimum"), False
    if "exclusiveMinimum" in node:
        lo, lo_open = node["exclusiveMinimum"], True
    hi, hi_open = node.get("maximum"), False
    if "exclusiveMaximum" in node:
        hi, hi_open = node["exclusiveMaximum"], True
    if lo is None and hi is None:
        lo, hi = -span / 3, span
    elif lo is None:
        lo = hi - span
    elif hi is None:
        hi = lo + span
    if integer:
        lo, hi = math.floor(lo) + (1 if lo_open else 0), math.ceil(hi) - (1 if hi_open else 0)
        lo_open = hi_open = False
    return lo, hi, lo_open, hi_open


class Strategies:
    """JSON documents a schema accepts. ``hint(path, node)`` may return a strategy for a path
    (keys and indices from the section root) to replace the generic one; ``skip`` names keys
    never drawn. Numbers without bounds stay small (a search of 10^6 iterations is not a test)."""

    def __init__(self, defs: Mapping[str, Any], hint=None, skip: frozenset[str] = frozenset(), span: int = 6,
                 skip_paths: frozenset[tuple] = frozenset()):
        self.defs, self.hint, self.skip, self.span, self.skip_paths = defs, hint, skip, span, skip_paths

    def of(self, node: Any, path: tuple = ()) -> st.SearchStrategy:
        node = resolve(node, self.defs)
        if self.hint is not None:
            hinted = self.hint(path, node)
            if hinted is not None:
                return hinted
        if not isinstance(node, Mapping) or not node:
            return JSON_SCALARS
        if "const" in node:
            return st.just(node["const"])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        for key in ("oneOf", "anyOf"):
            if key in node:
                options = [self.of(branch, path) for branch in node[key]]
                return st.one_of(options).filter(lambda v, n=node: validates(v, n, self.defs))
        kind = node.get("type")
        if isinstance(kind, list):
            return st.one_of([self.of({**node, "type": k}, path) for k in kind])
        if kind == "object" or "properties" in node:
            return self.obj(node, path)
        if kind == "array":
            return self.array(node, path)
        if kind in ("integer", "number"):
            lo, hi, lo_open, hi_open = bounds(node, kind == "integer", self.span)
            if kind == "integer":
                return st.integers(int(lo), int(hi))
            return st.floats(lo, hi, exclude_min=lo_open, exclude_max=hi_open, allow_nan=False)
        if kind == "boolean":
            return st.booleans()
        if kind == "string":
            return st.sampled_from(["x", "conv1", "a b"]).filter(lambda s: len(s) >= node.get("minLength", 0))
        if kind == "null":
            return st.none()
        return JSON_SCALARS

    def obj(self, node: Mapping[str, Any], path: tuple) -> st.SearchStrategy:
        props = {k: v for k, v in node.get("properties", {}).items()
                 if k not in self.skip and (*path, k) not in self.skip_paths}
        if not props:
            return st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2)
        required = set(node.get("required", ()))
        return st.fixed_dictionaries(
            {k: self.of(v, (*path, k)) for k, v in props.items() if k in required},
            optional={k: self.of(v, (*path, k)) for k, v in props.items() if k not in required},
        )

    def array(self, node: Mapping[str, Any], path: tuple) -> st.SearchStrategy:
        lo = node.get("minItems", 0)
        hi = min(node.get("maxItems", lo + 3), lo + 3)
        if "prefixItems" in node:
            return st.tuples(*(self.of(v, (*path, i)) for i, v in enumerate(node["prefixItems"]))).map(list)
        return st.lists(self.of(node.get("items", {}), (*path, 0)), min_size=lo, max_size=hi)


ROOT = registered_schema()
DEFS = ROOT["$defs"]


def section_schema(name: str) -> Mapping[str, Any]:
    schema = ALGORITHMS[name].schema
    assert schema is not None, f"{name} registered no schema"
    return schema


def wrap(sections: list[dict[str, Any]]) -> dict[str, Any]:
    return {"input_info": {"sample_size": INPUT}, "compression": sections if len(sections) > 1 else sections[0]}


# --------------------------------------------------------------- property 1: whatever the schema accepts

def any_hint(path: tuple, node: Mapping[str, Any]) -> st.SearchStrategy | None:
    """Keep every schema-valid value possible; only scope strings and file paths come from palettes
    (a random file name would be created or searched for in the working directory)."""
    last = path[-1] if path else None
    if last in ("ignored_scopes", "target_scopes"):
        one = st.sampled_from(SCOPES_THAT_MATCH + SCOPES_THAT_MATCH_NOTHING)
        return st.one_of(one, st.lists(one, max_size=3))
    if isinstance(last, str) and last.endswith("_path"):
        return st.just("does/not/exist.json")
    return None


def any_section(name: str) -> st.SearchStrategy:
    return Strategies(DEFS, any_hint).of(section_schema(name))


@st.composite
def any_configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(ALL), min_size=1, max_size=3))
    config = wrap([draw(any_section(n)) for n in names])
    extra = draw(st.fixed_dictionaries({}, optional={
        "target_device": st.sampled_from(["ANY", "CPU", "GPU", "NPU", "TRIAL"]),
        "epochs": st.integers(1, 3), "workers": st.just(2), "model": st.just("net"),
    }))
    return {**config, **extra}


def path_parts(path: str) -> list[Any]:
    """``compression[1].weights.bits`` -> ``['compression', 1, 'weights', 'bits']``."""
    parts: list[Any] = []
    for piece in path.replace("[", ".[").split("."):
        if not piece:
            continue
        parts.append(int(piece[1:-1]) if piece.startswith("[") else piece)
    return parts


def reaches(doc: Any, parts: list[Any]) -> bool:
    """Whether the JSON path's parent exists in ``doc`` (the last key may be the missing or unknown one)."""
    node = doc
    for part in parts[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def assert_names_a_path(error: PurecompError, config: Mapping[str, Any]) -> None:
    if isinstance(error, ConfigError):
        assert error.path, f"ConfigError without a JSON path: {error}"
        parts = path_parts(error.path)
        assert parts and reaches(config, parts), f"{error.path!r} is not a path into the config: {error}"


def build_or_raise(config: Mapping[str, Any]) -> str:
    """Load, build and train ``config``; a ``PurecompError`` is an accepted outcome (returns its
    class name), any other exception fails the test."""
    note(json.dumps(config, default=str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            train(config)
        except PurecompError as exc:
            assert_names_a_path(exc, config)
            return type(exc).__name__
    return "built"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a config makes a method write lands here


@fuzz_settings(QUICK)
@given(config=any_configs())
def test_schema_valid_configs_build_or_raise_a_purecomp_error(config):
    build_or_raise(config)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(config=any_configs())
def test_schema_valid_configs_build_or_raise_a_purecomp_error_slow(config):
    build_or_raise(config)


# --------------------------------------------------------------- property 2: valid configs build and train

LEVEL_LOW, LEVEL_HIGH = st.floats(0.0, 0.3), st.floats(0.35, 0.9)
# keys that only make a config fail on purpose (not implemented, needs files) or cost minutes
NEVER_VALID = frozenset({
    "scope_overrides", "unified_scale_ops", "compression_lr_multiplier", "legr_params",
    "save_ranking_coeffs_path", "load_ranking_coeffs_path", "traces_per_layer_path", "all_weights",
    "interlayer_ranking_type", "accuracy_aware_training", "activations_quant_start_epoch",
    "weights_quant_start_epoch", "validate_scopes", "num_data_points", "iter_number", "warmup_iter_number",
    "eval_subset_ratio", "multistep_steps", "multistep_sparsity_levels", "pruning_flops_target", "sparsity_freeze_epoch",
})


def scopes_that_match(ignore: bool) -> st.SearchStrategy:
    """Patterns that match sites; ignored ones leave conv2 and conv3 to compress."""
    if ignore:
        palette = ["conv1", "fc", "{re}^fc", "conv1/conv2d#0"]
        return st.one_of(st.sampled_from(palette), st.lists(st.sampled_from(palette), min_size=1, max_size=2, unique=True))
    # conv2 stays selected: the manual precision below names its weight
    return st.sampled_from(["conv2", "{re}conv[23]", ["conv2", "conv3"], ["conv2/conv2d#0"]])


def valid_hint(name: str):
    def hint(path: tuple, node: Mapping[str, Any]) -> st.SearchStrategy | None:
        last = path[-1] if path else None
        if last == "ignored_scopes":
            return scopes_that_match(ignore=True)
        if last == "target_scopes":
            return scopes_that_match(ignore=False)
        if last in ("sparsity_init", "pruning_init"):
            return LEVEL_LOW
        if last in ("sparsity_target", "pruning_target"):
            return LEVEL_HIGH
        if last == "schedule" and name == "magnitude_sparsity":
            return st.sampled_from(["polynomial", "exponential"])
        if last == "range" and "oneOf" in node:
            branch = next(b for b in node["oneOf"] if resolve(b, DEFS).get("type") == "object")
            return Strategies(DEFS, hint, NEVER_VALID, skip_paths=VALID_SKIP_PATHS).of(branch, path)
        if last == "params" and path[-2:-1] == ("range",):
            return st.fixed_dictionaries({}, optional={"min_percentile": st.floats(0, 10),
                                                       "max_percentile": st.floats(90, 100)})
        if last == "precision":
            return st.one_of(
                st.just({"type": "hawq", "bits": [4, 8], "num_data_points": 2, "iter_number": 2,
                         "compression_ratio": 1.5}),
                st.builds(lambda b: {"type": "manual", "bitwidth_per_scope": [[b, "conv2.weight"]]},
                          st.integers(2, 8)),
            )
        if last in ("num_init_samples", "num_bn_adaptation_samples"):
            return st.integers(1, 4)
        if last == "params" and name == "quantization":
            return st.just({})
        if last == "params" and name == "binarization":
            return st.fixed_dictionaries({}, optional={"activations_quant_start_epoch": st.integers(0, 2),
                                                       "weights_quant_start_epoch": st.integers(0, 2)})
        if path == ("activations", "per_channel"):
            return st.just(False)  # per-channel activation quantizers are refused
        if last == "sparsity_level_setting_mode" and name == "rb_sparsity":
            return st.just("global")  # RB with local levels is refused
        if last == "pruning_steps":
            return st.integers(1, 3)
        if last == "sparsity_target_epoch":
            return st.integers(1, 3)
        return None

    return hint


# scopes per quantizer group are refused (not implemented); the section-level aliases of params keys too
VALID_SKIP_PATHS = frozenset({(g, k) for g in ("weights", "activations") for k in ("ignored_scopes", "target_scopes")}
                             | {("weight_importance",), ("sparsity_level_setting_mode",)})


SKIP_PATHS_OF = {"filter_pruning": frozenset({("params", "weight_importance")})}  # NNCF's filter_importance only


def valid_section(name: str) -> st.SearchStrategy:
    skip = VALID_SKIP_PATHS | SKIP_PATHS_OF.get(name, frozenset())
    return Strategies(DEFS, valid_hint(name), NEVER_VALID, skip_paths=skip).of(section_schema(name))


# one method per weight-encoding kind: two quantizations, or binarization with quantization, of the same
# weights train but do not export (tested below); sparsity and pruning go before quantization
VALID_STACKS = [(n,) for n in ALL] + [
    ("magnitude_sparsity", "quantization"), ("rb_sparsity", "quantization"), ("const_sparsity", "quantization"),
    ("filter_pruning", "quantization"), ("filter_pruning", "binarization"), ("magnitude_sparsity", "filter_pruning"),
]


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.sampled_from(VALID_STACKS))
    return wrap([draw(valid_section(n)) for n in names])


def build_valid(config: Mapping[str, Any]) -> None:
    note(json.dumps(config))
    assert validates(config, ROOT, DEFS), "the valid strategy drew a document the schema refuses"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config)


@fuzz_settings(QUICK)
@given(config=valid_configs())
def test_valid_configs_build_and_train(config):
    build_valid(config)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(config=valid_configs())
def test_valid_configs_build_and_train_slow(config):
    build_valid(config)


# --------------------------------------------------------------- property 3: mutations of valid configs


def walk(value: Any, node: Any, path: tuple) -> Iterator[tuple[tuple, Any, Mapping[str, Any]]]:
    """``(path, value, schema node)`` for every value of a document, following the schema."""
    node = resolve(node, DEFS)
    if not isinstance(node, Mapping):
        return
    for key in ("oneOf", "anyOf"):
        if key in node:
            branch = next((b for b in node[key] if validates(value, resolve(b, DEFS), DEFS)), None)
            if branch is not None:
                yield from walk(value, branch, path)
            return
    yield path, value, node
    if isinstance(value, dict):
        for k, v in value.items():
            if k in node.get("properties", {}):
                yield from walk(v, node["properties"][k], (*path, k))
    elif isinstance(value, list):
        prefix = node.get("prefixItems", [])
        for i, v in enumerate(value):
            yield from walk(v, prefix[i] if i < len(prefix) else node.get("items", {}), (*path, i))


def sites_of(config: Mapping[str, Any]) -> list[tuple[tuple, Any, Mapping[str, Any]]]:
    section = config["compression"]
    sections = [((), section)] if isinstance(section, dict) else [((i,), s) for i, s in enumerate(section)]
    out = []
    for prefix, s in sections:
        out += walk(s, section_schema(s["algorithm"]), ("compression", *prefix))
    return out


def put(config: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    mutated = copy.deepcopy(config)
    node = mutated
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return mutated


def types_of(node: Mapping[str, Any]) -> set[str]:
    if "const" in node or "enum" in node:
        values = [node["const"]] if "const" in node else node["enum"]
        return {type(v).__name__ for v in values}
    kind = node.get("type")
    return set(kind) if isinstance(kind, list) else {kind} if kind else set()


WRONG = {"string": "eight", "integer": 3, "number": 0.5, "boolean": True, "array": [1], "object": {"k": 1},
         "null": None}


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, dict[str, Any], tuple]:
    """``(kind, mutated config, mutated path)`` from a valid config."""
    config = draw(valid_configs())
    kinds = draw(st.sampled_from(["wrong_type", "unknown_key", "out_of_range", "empty_list", "unmatched_scope",
                                  "not_a_number"]))
    sites = [s for s in sites_of(config) if s[0][-1:] != ("algorithm",)]
    if kinds == "unknown_key":
        objects = [s for s in sites if isinstance(s[1], dict) and s[2].get("additionalProperties") is False]
        path, _, _ = draw(st.sampled_from(objects))
        return kinds, put(config, (*path, "zz_unknown"), 1), (*path, "zz_unknown")
    if kinds == "wrong_type":
        path, value, node = draw(st.sampled_from(sites))
        wrong = [v for k, v in WRONG.items() if k not in types_of(node) and not (k == "integer" and "number" in types_of(node))]
        return kinds, put(config, path, draw(st.sampled_from(wrong))), path
    if kinds in ("out_of_range", "not_a_number"):
        numeric = [s for s in sites if isinstance(s[1], (int, float)) and not isinstance(s[1], bool)
                   and s[2].get("type") in ("integer", "number")]
        if kinds == "out_of_range":
            numeric = [s for s in numeric if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(s[2])]
        if not numeric:  # no number in this config: an unknown algorithm instead
            return "unknown_algorithm", put(config, ("compression",), {"algorithm": "no_such_method"}), (
                "compression", "algorithm")
        path, _, node = draw(st.sampled_from(numeric))
        if kinds == "not_a_number":
            return kinds, put(config, path, draw(st.sampled_from([math.nan, math.inf, -math.inf]))), path
        options = [node["minimum"] - 1 if "minimum" in node else None, node.get("exclusiveMinimum"),
                   node["maximum"] + 1 if "maximum" in node else None, node.get("exclusiveMaximum")]
        return kinds, put(config, path, draw(st.sampled_from([o for o in options if o is not None]))), path
    if kinds == "empty_list":
        lists = [s for s in sites if isinstance(s[1], list) and s[2].get("minItems", 0) >= 1]
        if not lists:
            return kinds, put(config, ("compression",), []), ("compression",)
        path, _, _ = draw(st.sampled_from(lists))
        return kinds, put(config, path, []), path
    section = ("compression",) if isinstance(config["compression"], dict) else (
        "compression", draw(st.integers(0, len(config["compression"]) - 1)))
    key = draw(st.sampled_from(["ignored_scopes", "target_scopes"]))
    pattern = draw(st.sampled_from(SCOPES_THAT_MATCH_NOTHING))
    return kinds, put(config, (*section, key), [pattern]), (*section, key)


def check_mutation(kind: str, config: dict[str, Any], path: tuple) -> None:
    note(f"{kind} at {json_path(path)}: {json.dumps(config, default=str)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            train(config)
    error = info.value
    parts = path_parts(error.path)
    if kind in ("unknown_key", "unknown_algorithm"):
        assert error.path == json_path(path), str(error)
    elif kind == "unmatched_scope":
        assert isinstance(error, ScopeError) and error.path.startswith(json_path(path)), str(error)
    else:
        # the mutated value, the object / list holding it, or a place inside the wrong value
        n = min(len(parts), len(path))
        assert parts and parts[:n] == list(path[:n]), f"{error.path!r} does not lead to {json_path(path)}: {error}"


@fuzz_settings(QUICK * 2)
@given(case=mutations())
def test_mutations_raise_a_config_error_naming_their_path(case):
    check_mutation(*case)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(case=mutations())
def test_mutations_raise_a_config_error_naming_their_path_slow(case):
    check_mutation(*case)


# --------------------------------------------------------------- contradictory stacks

Q, B = {"algorithm": "quantization"}, {"algorithm": "binarization"}
P = {"algorithm": "filter_pruning", "params": {"pruning_target": 0.5, "num_init_steps": 0, "pruning_steps": 1}}


@pytest.mark.parametrize("stack", [[Q, Q], [B, Q], [Q, B], [B, B]], ids=["QQ", "BQ", "QB", "BB"])
def test_two_weight_encodings_of_the_same_weights_train_but_export_refuses(stack, tmp_path):
    """Documented behaviour: a chain composes (the second method quantizes the first's output, a
    well-defined function), so it trains; materialize / export refuse with ``StateError`` naming
    the weight encoded twice (before, quantization then binarization wrote invalid ONNX)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl = train(wrap(stack))
    with pytest.raises(pc.errors.StateError, match="'conv1.weight' is encoded twice"):
        ctrl.export_model(tmp_path / "model.onnx")


def test_quantizations_of_disjoint_weights_meet_at_a_shared_activation_site(tmp_path):
    stack = [{**Q, "target_scopes": ["conv2"]}, {**Q, "ignored_scopes": ["conv2"]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl = train(wrap(stack))
    with pytest.raises(pc.errors.StateError, match="two activation transforms at"):
        ctrl.strip()


@pytest.mark.parametrize("stack", [[P, B], [B, P], [{"algorithm": "magnitude_sparsity"}, {"algorithm": "rb_sparsity"}]],
                         ids=["PB", "BP", "MR"])
def test_other_stacks_train_and_export(stack, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl = train(wrap(stack))
    assert ctrl.export_model(tmp_path / "model.onnx").is_file()


def test_a_section_that_selects_no_weight_is_an_identity():
    """``target_scopes: []`` (NNCF: nothing targeted) or ignored == target: the method holds no mask
    (before, magnitude and RB sparsity crashed in torch.cat)."""
    for name in ("magnitude_sparsity", "rb_sparsity"):
        for section in ({"target_scopes": []}, {"ignored_scopes": "conv2", "target_scopes": "conv2"}):
            ctrl = train(wrap([{"algorithm": name, **section}]))
            assert all(t.numel() == 0 or name == "rb_sparsity" for t in pc.struct.tree_leaves(ctrl.state)), name
