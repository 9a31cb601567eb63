"""What crosses Flower's wire: a host call's arguments or result as a Flower `RecordDict` of one
`ArrayRecord` (every tensor, as a numpy array saved without pickle) and one `ConfigRecord` (the
call's name and a JSON tree of everything else, where each tensor is a reference to its array).
Nothing is pickled either way: arrays are numpy's `.npy` bytes read with `allow_pickle=False`,
the rest is JSON of plain values and the dataclasses named in `MESSAGES`.

Decoding is validation: a message that does not decode to exactly what was encoded (an unknown
type, a missing or extra field, a tensor whose dtype or shape differs from what the tree says or
from what its message type allows, a floating tensor with NaN or inf) raises `MalformedMessage`,
one sentence naming the part that is wrong."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import torch

from hsplitlora.compression import MODES, Packed
from hsplitlora.data.e2e import Batch
from hsplitlora.errors import MalformedMessage
from hsplitlora.method.aggregation import AdapterFactors, StackedDelta
from hsplitlora.roles import messages as wire  # the message types, by name: wire.Activations, ...
from hsplitlora.roles.adapters import ANCHOR_CODES

ARRAYS, CALL = "arrays", "call"  # the RecordDict's two records
MESSAGES = {cls.__name__: cls for cls in (
    wire.Activations, wire.ActivationGradient, wire.MiddleActivations, wire.TailGradient, wire.StepRecord,
    wire.RoundPlan, wire.AdapterUpload, wire.OwnTerm, wire.PartialStack, wire.ModelUpdate, wire.AdapterBroadcast,
    Packed, AdapterFactors, StackedDelta, Batch,
)}  # fmt: skip
DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32,
    torch.int64, torch.bool,
)}  # fmt: skip
PACKED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def encode(name: str, value: Any):
    """`value` (the arguments or result of host call `name`) as a Flower RecordDict."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    arrays: dict[str, Array] = {}
    tree = _tree(value, arrays)
    body = json.dumps(tree, separators=(",", ":"))
    return RecordDict({ARRAYS: ArrayRecord(arrays), CALL: ConfigRecord({"name": name, "body": body})})


def decode(record, name: str | None = None) -> Any:
    """The value `encode` was given, validated; with `name`, the record must be call `name`'s."""
    from flwr.app import ArrayRecord, ConfigRecord

    try:
        call, arrays = record[CALL], record[ARRAYS]
    except KeyError as error:
        raise MalformedMessage(f"the message has no {error.args[0]!r} record; it was not made by this codec.") from None
    if not isinstance(call, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise MalformedMessage("the message's records are not a ConfigRecord 'call' and an ArrayRecord 'arrays'.")
    if name is not None and call.get("name") != name:
        raise MalformedMessage(f"the message answers call {call.get('name')!r}, not {name!r}.")
    body = call.get("body")
    if not isinstance(body, str):
        raise MalformedMessage("the message's 'call' record has no JSON 'body'.")
    try:
        tree = json.loads(body)
    except json.JSONDecodeError as error:
        raise MalformedMessage(f"the message's body is not JSON ({error.msg} at position {error.pos}).") from None
    used: set[str] = set()
    value = _value(tree, arrays, used, "body")
    if extra := sorted(set(arrays.keys()) - used):
        raise MalformedMessage(f"the message carries arrays its body never names: {', '.join(extra[:5])}.")
    return value


def call_name(record) -> str:
    """The name of the host call a record carries ('' when it carries none)."""
    call = record.get(CALL) if hasattr(record, "get") else None
    return str(call.get("name", "")) if call is not None else ""


# -- encoding ---------------------------------------------------------------------------------------
def _tree(value: Any, arrays: dict) -> Any:
    """A JSON tree of `value`; tensors go into `arrays` and appear as {"$tensor": key, ...}."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        return _tensor(value, arrays)
    if isinstance(value, tuple):
        return {"$tuple": [_tree(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_tree(v, arrays) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"only dicts with string keys cross Flower's wire, not {sorted(map(repr, value))[:3]}")
        return {"$dict": {k: _tree(v, arrays) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and MESSAGES.get(type(value).__name__) is type(value):
        fields = {f.name: _tree(getattr(value, f.name), arrays) for f in dataclasses.fields(value)}
        return {"$message": type(value).__name__, "fields": fields}
    raise TypeError(f"{type(value).__name__} does not cross Flower's wire (only tensors, plain values and MESSAGES)")


def _tensor(tensor: torch.Tensor, arrays: dict) -> dict:
    from flwr.app import Array

    tensor = tensor.detach().to("cpu")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise TypeError(f"tensors of dtype {dtype} do not cross Flower's wire")
    # numpy has no bfloat16: its bits travel as int16 and the tree says what they are.
    values = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    key = f"t{len(arrays)}"
    arrays[key] = Array(values.contiguous().numpy())
    return {"$tensor": key, "dtype": dtype, "shape": list(tensor.shape)}


# -- decoding ---------------------------------------------------------------------------------------
def _value(tree: Any, arrays, used: set[str], where: str) -> Any:
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, list):
        return [_value(v, arrays, used, f"{where}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, dict) or len(tree) == 0:
        raise MalformedMessage(f"{where} is {type(tree).__name__} {tree!r}, not a value this codec writes.")
    tag = next(iter(tree))
    if tag == "$float" and len(tree) == 1 and tree[tag] in ("nan", "inf", "-inf"):
        return float(tree[tag])
    if tag == "$tuple" and len(tree) == 1 and isinstance(tree[tag], list):
        return tuple(_value(v, arrays, used, f"{where}[{i}]") for i, v in enumerate(tree[tag]))
    if tag == "$dict" and len(tree) == 1 and isinstance(tree[tag], dict):
        return {k: _value(v, arrays, used, f"{where}.{k}") for k, v in tree[tag].items()}
    if tag == "$tensor" and set(tree) == {"$tensor", "dtype", "shape"}:
        return _array(tree, arrays, used, where)
    if tag == "$message" and set(tree) == {"$message", "fields"}:
        return _message(tree, arrays, used, where)
    raise MalformedMessage(f"{where} is tagged {tag!r}, which this codec does not know.")


def _array(tree: dict, arrays, used: set[str], where: str) -> torch.Tensor:
    key, dtype, shape = tree["$tensor"], tree["dtype"], tree["shape"]
    if dtype not in DTYPES:
        raise MalformedMessage(f"{where} has dtype {dtype!r}; known: {', '.join(DTYPES)}.")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise MalformedMessage(f"{where} has shape {shape!r}, not a list of sizes.")
    if not isinstance(key, str) or key not in arrays:
        raise MalformedMessage(f"{where} names array {key!r}, which the message does not carry.")
    if key in used:
        raise MalformedMessage(f"{where} names array {key!r} a second time.")
    used.add(key)
    try:
        values = arrays[key].numpy()  # numpy's .npy reader, allow_pickle=False
    except Exception as error:  # noqa: BLE001  (whatever a damaged buffer raises)
        raise MalformedMessage(f"{where}'s array {key!r} is not a numpy array ({error}).") from None
    expected = np.dtype("int16") if dtype == "bfloat16" else torch.empty(0, dtype=DTYPES[dtype]).numpy().dtype
    if values.dtype != expected:
        raise MalformedMessage(f"{where} is {values.dtype} on the wire where its body says {dtype}.")
    if list(values.shape) != shape:
        raise MalformedMessage(f"{where} has shape {list(values.shape)} on the wire where its body says {shape}.")
    tensor = torch.from_numpy(values)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MalformedMessage(f"{where} ({dtype}, shape {shape}) holds NaN or inf values.")
    return tensor


def _message(tree: dict, arrays, used: set[str], where: str):
    name, fields = tree["$message"], tree["fields"]
    cls = MESSAGES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise MalformedMessage(f"{where} is a {name!r} message, which this codec does not know.")
    if not isinstance(fields, dict):
        raise MalformedMessage(f"{where}'s fields are not an object.")
    names = [f.name for f in dataclasses.fields(cls)]
    if missing := [n for n in names if n not in fields]:
        raise MalformedMessage(f"{where} ({name}) lacks field(s) {', '.join(missing)}.")
    if extra := sorted(set(fields) - set(names)):
        raise MalformedMessage(f"{where} ({name}) has unknown field(s) {', '.join(extra)}.")
    values = {n: _value(fields[n], arrays, used, f"{where}.{n}") for n in names}
    message = cls(**values)
    _check(message, f"{where} ({name})")
    return message


def _check(message, where: str) -> None:
    """The shapes and dtypes a message's own type allows (its fields agree with one another)."""

    def need(condition: bool, what: str) -> None:
        if not condition:
            raise MalformedMessage(f"{where}: {what}.")

    def is_tensor(value, dims: int | None = None) -> bool:
        return isinstance(value, torch.Tensor) and (dims is None or value.dim() == dims)

    if isinstance(message, Packed):
        need(message.mode in MODES, f"compression {message.mode!r} is not one of {', '.join(MODES)}")
        need(is_tensor(message.data), "the payload is not a tensor")
        need(message.data.dtype == PACKED_DTYPES[message.mode],
             f"a {message.mode} payload is {message.data.dtype}, not {PACKED_DTYPES[message.mode]}")  # fmt: skip
        scaled = message.mode in ("fp16", "int8")
        need((message.scale is not None) == scaled, f"{message.mode} {'needs' if scaled else 'has no'} scales")
    elif isinstance(message, wire.Activations | wire.ActivationGradient | wire.MiddleActivations | wire.TailGradient):
        payload = message.hidden if hasattr(message, "hidden") else message.grad
        need(isinstance(payload, Packed | torch.Tensor), "the payload is neither a tensor nor Packed")
        need(len(payload.shape) == 3, f"the payload has shape {list(payload.shape)}, not (batch, tokens, hidden)")
        if isinstance(message, wire.Activations):
            mask = message.attention_mask
            need(is_tensor(mask, 2) and tuple(mask.shape) == tuple(payload.shape[:2]),
                 "the attention mask is not (batch, tokens) of the activations")  # fmt: skip
            need(message.labels is None or (is_tensor(message.labels) and message.labels.shape ==
                 message.attention_mask.shape), "the labels are not shaped as the attention mask")  # fmt: skip
        if isinstance(message, wire.ActivationGradient):
            need(message.loss is None or math.isfinite(message.loss), f"the loss is {message.loss}")
    elif isinstance(message, AdapterFactors):
        need(is_tensor(message.a, 2) and is_tensor(message.b, 2), "a and b are not matrices")
        need(message.a.shape[0] == message.b.shape[1],
             f"a has {message.a.shape[0]} rows and b {message.b.shape[1]} columns (the rank differs)")  # fmt: skip
        need(message.anchor in ANCHOR_CODES, f"anchor {message.anchor!r} is not one of {', '.join(ANCHOR_CODES)}")
        if message.anchor == "sent":
            need(is_tensor(message.anchor_a) and message.anchor_a.shape == message.a.shape
                 and is_tensor(message.anchor_b) and message.anchor_b.shape == message.b.shape,
                 "a sent anchor is not shaped as the factors")  # fmt: skip
    elif isinstance(message, StackedDelta):
        need(is_tensor(message.a, 2) and is_tensor(message.b, 2) and message.b.shape[1] == message.a.shape[0],
             "b's columns and a's rows differ")  # fmt: skip
    elif isinstance(message, Batch):
        shapes = {tuple(t.shape) for t in (message.input_ids, message.attention_mask, message.labels)}
        need(len(shapes) == 1 and len(next(iter(shapes))) == 2, "ids, mask and labels differ in (batch, tokens)")
    elif isinstance(message, wire.AdapterUpload):
        need(isinstance(message.factors, dict) and all(isinstance(f, AdapterFactors) for f in message.factors.values()),
             "the factors are not AdapterFactors by candidate")  # fmt: skip
    elif isinstance(message, wire.RoundPlan):
        need(isinstance(message.split_point, int) and message.split_point >= 0, "the split point is not a count")
        need(isinstance(message.recompute, bool), "recompute is not true or false")
