"""The checkpoint codec (purecomp.checkpoint): encode_state/decode_state, the record file
(save_record/load_record, written atomically), save_state/load_state, and files of earlier
versions."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import purecomp as pc
from purecomp.checkpoint import (
    FORMAT,
    decode_state,
    encode_state,
    load_record,
    load_state,
    save_record,
    save_state,
)
from purecomp.errors import StateError
from purecomp.registry import STATE_CLASSES, class_name
from purecomp.struct import static_field, struct
from purecomp.transforms.quantize.quantizer import AsymmetricQuantizer, SymmetricQuantizer


@struct
class Outsider:
    """A struct defined outside purecomp and not registered."""

    value: torch.Tensor
    tag: str = static_field(default="t")


def sample_state():
    weight_scale = torch.tensor([0.5, 0.25]).requires_grad_(True)
    return {
        "quant": (
            SymmetricQuantizer(weight_scale, bits=8, signed=True, narrow_range=True, axis=0),
            AsymmetricQuantizer(torch.tensor(-1.0).requires_grad_(True), torch.tensor(2.0).requires_grad_(True), bits=4),
        ),
        "masks": {"0.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "bias": None},
        "levels": [0.1, 2, "linear", True, None, [1, (2, 3)]],
        "dtypes": (torch.float16, torch.int8, torch.bool),
        "ints": torch.arange(4, dtype=torch.int64),
        "half": torch.tensor([1.5], dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "progress": pc.Progress(step=3, epoch=1, steps_per_epoch=10),
        "empty": ((), {}, []),
    }


def assert_same(a, b):
    """Equal structure, types, tensors (values, dtypes, requires_grad) and plain values."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b) and a.requires_grad == b.requires_grad
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b


def test_encode_decode_round_trip_keeps_structure_types_and_flags():
    state = sample_state()
    structure, tensors = encode_state(state)
    assert json.loads(structure)["format"] == FORMAT
    assert len(tensors) == 7
    assert all(not t.requires_grad for t in tensors), "tensors are detached copies"
    decoded = decode_state(structure, tensors)
    assert_same(decoded, state)
    assert decoded["quant"][0].scale is not state["quant"][0].scale
    assert decoded["quant"][0].scale.requires_grad and not decoded["masks"]["0.weight"].requires_grad
    # decoding twice gives independent tensors
    again = decode_state(structure, tensors)
    with torch.no_grad():
        again["ints"].add_(1)
    assert torch.equal(decoded["ints"], torch.arange(4))
    assert torch.equal(decode_state(structure, tensors)["ints"], torch.arange(4)), "the tensor list is not changed"


def test_plain_dicts_whose_keys_look_like_markers_round_trip():
    state = {"$tensor": 5, "$class": "os:system", "inner": {"$tuple": [1]}}
    assert decode_state(*encode_state(state)) == state


def test_a_shared_tensor_is_saved_once_and_comes_back_shared():
    t = torch.tensor([1.0, 2.0]).requires_grad_(True)
    state = (t, {"again": t}, [t, torch.ones(1)])
    structure, tensors = encode_state(state)
    assert len(tensors) == 2
    decoded = decode_state(structure, tensors)
    assert decoded[0] is decoded[1]["again"] is decoded[2][0]
    assert decoded[2][1] is not decoded[0]


@pytest.mark.parametrize("bad", [{1: torch.ones(1)}, {("a",): 1}, {"ok": {2.5: 1}}])
def test_non_string_dict_keys_are_refused(bad):
    with pytest.raises(StateError, match="non-string keys"):
        encode_state(bad)


def test_unsupported_values_are_refused():
    with pytest.raises(StateError, match="type set"):
        encode_state({"s": {1, 2}})
    with pytest.raises(StateError, match="type object"):
        encode_state([object()])


def doc(state) -> str:
    return json.dumps({"format": FORMAT, "state": state})


@pytest.mark.parametrize(
    ("structure", "tensors", "match"),
    [
        ("{not json", [], "not valid JSON"),
        (None, [], "not valid JSON"),
        (json.dumps({"format": "something-else", "state": 1}), [], "not a purecomp state"),
        (json.dumps([FORMAT]), [], "not a purecomp state"),
        (doc({"$tensor": 1}), [torch.ones(1)], "tensor 1, but the checkpoint holds 1 tensors"),
        (doc({"$tensor": -1}), [torch.ones(1)], "tensor -1"),
        (doc({"$tensor": "0"}), [torch.ones(1)], "tensor '0'"),
        (doc([{"$tensor": 0}]), [], "holds 0 tensors"),
        (doc({"$weird": 1}), [], r"unknown entry in a saved state: \['\$weird'\]"),
        (doc({"$tuple": [{"a": 1}]}), [], "unknown entry"),
        (doc({"$class": "os:system", "fields": {}}), [], "not a purecomp class"),
        (doc({"$class": "purecompany.evil:Thing", "fields": {}}), [], "not a purecomp class"),
        (doc({"$class": "purecomp.compression:NoSuchStruct", "fields": {}}), [], "does not exist"),
        (doc({"$class": "purecomp.compression:Compression", "fields": {}}), [], "does not exist"),
        (doc({"$class": "purecomp.compression:Progress", "fields": {"bogus": 1}}), [], "cannot rebuild"),
        (doc({"$tensor": 0}), ["not a tensor"], "is a str, not a Tensor"),
    ],
)
def test_malformed_structures_raise_state_error(structure, tensors, match):
    with pytest.raises(StateError, match=match):
        decode_state(structure, tensors)


@pytest.mark.parametrize(
    "state",
    [
        {"$class": "purecomp.compression:Progress"},  # no "fields"
        {"$dtype": "torch.not_a_dtype"},
        {"$dict": [1, 2]},
        {"$tuple": 3},
        {"$class": 3, "fields": {}},
    ],
    ids=["class-without-fields", "not-a-dtype", "dict-not-a-mapping", "tuple-not-a-list", "class-not-a-string"],
)
def test_more_malformed_structures_should_raise_state_error(state):
    """Every malformed entry raises StateError, never KeyError / AttributeError / TypeError."""
    with pytest.raises(StateError):
        decode_state(doc(state), [])


def test_a_class_outside_purecomp_needs_registration(monkeypatch):
    state = {"mine": Outsider(torch.ones(2), tag="x")}
    structure, tensors = encode_state(state)
    assert class_name(Outsider) in structure
    with pytest.raises(StateError, match="not a purecomp class and was not registered"):
        decode_state(structure, tensors)
    monkeypatch.setitem(STATE_CLASSES, class_name(Outsider), Outsider)
    decoded = decode_state(structure, tensors)
    assert type(decoded["mine"]) is Outsider and decoded["mine"].tag == "x"
    assert torch.equal(decoded["mine"].value, torch.ones(2))


def test_save_record_and_load_record_with_extra_tensors_and_metadata(tmp_path):
    structure, tensors = encode_state(sample_state())
    record = {"structure": structure, "tensors": tensors, "builder": {"algorithm": "quantization", "bits": [8, 4]}}
    example = torch.randn(2, 3)
    path = save_record(tmp_path / "sub" / "record.safetensors", record,
                       extra_tensors={"example": example, "mask": torch.tensor([True, False])},
                       extra_metadata={"note": "hello", "json": json.dumps({"a": 1})})
    assert path == tmp_path / "sub" / "record.safetensors" and path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.safetensors"], "no temporary file is left"
    loaded, extra_tensors, extra_metadata = load_record(path)
    assert set(loaded) == {"structure", "tensors", "builder"}
    assert loaded["structure"] == structure and loaded["builder"] == record["builder"]
    assert len(loaded["tensors"]) == len(tensors)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(loaded["tensors"], tensors))
    assert set(extra_tensors) == {"example", "mask"}
    assert torch.equal(extra_tensors["example"], example) and extra_tensors["mask"].dtype == torch.bool
    assert extra_metadata == {"note": "hello", "json": json.dumps({"a": 1})}
    assert_same(decode_state(loaded["structure"], loaded["tensors"]), sample_state())


def test_save_state_and_load_state_round_trip(tmp_path):
    state = sample_state()
    path = save_state(tmp_path / "state.safetensors", state)
    assert_same(load_state(path), state)
    assert_same(load_state(str(path)), state)
    assert_same(pc.load_state(pc.save_state(tmp_path / "again.safetensors", ())), ())


def test_a_file_truncated_half_way_raises_state_error(tmp_path):
    state = {"w": torch.randn(64, 64), "levels": [0.5]}
    path = save_state(tmp_path / "state.safetensors", state)
    data = path.read_bytes()
    for cut in (len(data) // 2, 12, 4, 0):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(StateError, match="cannot read a purecomp state"):
            load_state(broken)
    with pytest.raises(StateError, match="cannot read"):
        load_state(tmp_path / "missing.safetensors")


def test_other_safetensors_files_are_refused(tmp_path):
    save_file({"weight": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StateError, match="without a purecomp state"):
        load_state(tmp_path / "plain.safetensors")
    save_file({"state.0": torch.ones(2)}, str(tmp_path / "damaged.safetensors"),
              metadata={"format": "purecomp-record-1", "record": "{oops"})
    with pytest.raises(StateError, match="record metadata is damaged"):
        load_record(tmp_path / "damaged.safetensors")
    structure, _ = encode_state((torch.ones(1), torch.ones(2)))
    save_file({"state.0": torch.ones(1), "state.2": torch.ones(2)}, str(tmp_path / "gap.safetensors"),
              metadata={"format": "purecomp-record-1", "record": json.dumps({"structure": structure})})
    with pytest.raises(StateError, match="missing tensors"):
        load_state(tmp_path / "gap.safetensors")


@pytest.mark.parametrize("fail_at", ["replace", "write"])
def test_a_failed_save_leaves_the_previous_file_loadable(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "state.safetensors"
    first = {"w": torch.arange(6.0).reshape(2, 3), "step": 1}
    save_state(path, first)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    if fail_at == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk gone"):
        save_state(path, {"w": torch.zeros(5), "step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert_same(load_state(path), first)
    # a later save succeeds over whatever the failed one left
    save_state(path, {"step": 3})
    assert load_state(path) == {"step": 3}


def test_files_of_the_pre_record_layout_still_load(tmp_path):
    state = {"quant": SymmetricQuantizer(torch.tensor(0.5), bits=8, signed=True, narrow_range=False),
             "mask": torch.tensor([1.0, 0.0]), "levels": (0.25, None)}
    structure, tensors = encode_state(state)
    old = tmp_path / "old.safetensors"
    save_file({f"t{i}": t.contiguous() for i, t in enumerate(tensors)}, str(old), metadata={"purecomp": structure})
    assert_same(load_state(old), state)
    record, extra_tensors, extra_metadata = load_record(old)
    assert record["structure"] == structure and extra_tensors == {} and extra_metadata == {}
    # an old file missing one of its tensors
    save_file({"t0": tensors[0]}, str(tmp_path / "old_gap.safetensors"),
              metadata={"purecomp": encode_state((torch.ones(1), torch.ones(1), torch.ones(1)))[0]})
    with pytest.raises(StateError):
        load_state(tmp_path / "old_gap.safetensors")


def test_every_torch_dtype_round_trips():
    dtypes = (torch.complex64, torch.float8_e4m3fn, torch.int16, torch.uint8)
    structure, tensors = encode_state({"dtypes": dtypes})
    assert decode_state(structure, tensors) == {"dtypes": dtypes}


def test_integer_tensors_cannot_be_marked_trainable():
    structure, tensors = encode_state((torch.ones(2),))
    with pytest.raises(StateError, match="only float tensors"):
        decode_state(structure.replace('"requires_grad": false', '"requires_grad": true'), [torch.ones(2, dtype=torch.int64)])
