"""The Flower codec: every message a host call sends or answers comes back from a Flower RecordDict
exactly as it went in (arrays bit for bit, numbers and names equal), and a message that is not
what its type allows is refused with one sentence naming the part that is wrong."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from hsplitlora.compression import pack
from hsplitlora.data.e2e import Batch
from hsplitlora.engines.flower_codec import ARRAYS, CALL, decode, encode
from hsplitlora.engines.flower_engine import ClientSpec
from hsplitlora.engines.spec import HostSpec
from hsplitlora.errors import MalformedMessage
from hsplitlora.method.aggregation import AdapterFactors, StackedDelta
from hsplitlora.roles.messages import (
    ActivationGradient,
    Activations,
    AdapterBroadcast,
    AdapterUpload,
    MiddleActivations,
    ModelUpdate,
    OwnTerm,
    PartialStack,
    RoundPlan,
    StepRecord,
    TailGradient,
)

flwr = pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

g = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def factors(client: int, anchor: str = "zero") -> AdapterFactors:
    sent = anchor == "sent"
    return AdapterFactors(client, 12, randn(4, 16), randn(24, 4), 2.0, anchor,
                          randn(4, 16) if sent else None, randn(24, 4) if sent else None)  # fmt: skip


MESSAGES = {
    "activations fp32": Activations(
        0, 3, pack(randn(2, 5, 16), "fp32"), torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), -100)
    ),
    "activations int8, u-shaped": Activations(
        1, 0, pack(randn(2, 5, 16), "int8"), torch.ones(2, 5, dtype=torch.long), None
    ),
    "gradient fp16": ActivationGradient(1, 2, pack(randn(2, 5, 16), "fp16"), 3.25, 17),
    "gradient bf16, no loss": ActivationGradient(0, 1, pack(randn(2, 5, 16), "bf16"), None, 9),
    "middle": MiddleActivations(0, 1, pack(randn(1, 3, 16), "int8")),
    "tail gradient": TailGradient(0, 1, pack(randn(1, 3, 16), "fp32")),
    "validation activations, raw": Activations(0, 0, randn(1, 3, 16), torch.ones(1, 3, dtype=torch.long), None),
    "step record": StepRecord(2.5, {"activations": 640, "gradients": 640}),
    "plan": RoundPlan(
        1, 2, 3, {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.v_proj": 0}, 1, "anchor"
    ),
    "plan recomputing": RoundPlan(0, 1, 2, {"q": 4}, recompute=True),
    "upload": AdapterUpload(1, 12, {"q": factors(1), "v": factors(1, "sent"), "k": factors(1, "held")}),
    "update": ModelUpdate(
        2, {"q": StackedDelta(randn(24, 8), randn(8, 16)), "v": randn(24, 16)}, {"q": 320, "v": 1536}
    ),
    "partial update": ModelUpdate(
        2,
        {
            "q": PartialStack(
                "int8",
                [
                    (
                        torch.randint(-127, 127, (24, 4), dtype=torch.int8),
                        torch.randint(-127, 127, (4, 16), dtype=torch.int8),
                        torch.rand(4, 1),
                    ),
                    OwnTerm(1, 0.25, True),
                ],
                torch.rand(24, 1),
                None,
            )
        },
        None,
    ),
    "broadcast": AdapterBroadcast(3, {"q": (randn(8, 16), randn(24, 8))}),
    "batch": Batch(torch.randint(0, 257, (2, 6)), torch.ones(2, 6, dtype=torch.long), torch.full((2, 6), -100)),
    "configure args": (RoundPlan(0, 1, 2, {"q": 4}), None),
    "apply_update args": (ModelUpdate(1, {"q": randn(24, 16)}, {"q": 1536}), True, [0, 2]),
    "weights result": {"model.layers.0.self_attn.q_proj": randn(16, 16), "lm_head.weight": randn(257, 16)},
    "client state": (
        {"batcher": {"rng": [3, [1, 2, 3], None], "queue": [[0, 1], [2]]}, "step": 4},
        {"rng": torch.Generator().get_state(), "adapter/q/a": randn(4, 16)},
    ),
    "importance report": ({"q": 0.125, "v": -3.5e-9}, 4),
    "validation result": (12.75, 30),
    "counters": {"samples": 8, "tokens": 312},
    "nothing": None,
    "names": ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"],
    "bfloat16 weights": {"w": randn(3, 4).to(torch.bfloat16)},
}


def equal(a, b) -> bool:
    """Exact equality through tensors (bit for bit, same dtype), dataclasses and containers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(MESSAGES))
def test_every_message_comes_back_exactly(name):
    record = encode("call", MESSAGES[name])
    assert isinstance(record, RecordDict)
    assert equal(decode(record, "call"), MESSAGES[name])


def test_a_message_holds_only_arrays_and_json():
    record = encode("apply_update", MESSAGES["apply_update args"])
    assert set(record) == {ARRAYS, CALL}
    for array in record[ARRAYS].values():
        assert array.stype == "numpy.ndarray"
        assert np.load(__import__("io").BytesIO(array.data), allow_pickle=False).dtype != object
    json.loads(record[CALL]["body"])  # the rest is JSON
    assert b"\x80\x04" not in record[CALL]["body"].encode()  # no pickle protocol header anywhere


def test_the_specs_round_trip_as_json():
    host = HostSpec("tiny", 0, ["q", "v"], 4, 256, 1e-3, 16.0, 4, "fp32", None, "float32", "none", "none", "cpu",
                    "cpu", 1)  # fmt: skip
    spec = ClientSpec(host, 1, 2, False, {"model": "tiny", "clients": 2})
    assert ClientSpec.from_json(spec.to_json()) == spec
    with pytest.raises(MalformedMessage, match="host spec has keys"):
        HostSpec.from_json(json.dumps({"model": "tiny"}))


def tampered(record: RecordDict, body=None, arrays=None) -> RecordDict:
    call = ConfigRecord({"name": record[CALL]["name"], "body": json.dumps(body) if body is not None else
                         record[CALL]["body"]})  # fmt: skip
    return RecordDict({ARRAYS: arrays if arrays is not None else record[ARRAYS], CALL: call})


def body_of(record: RecordDict) -> dict:
    return json.loads(record[CALL]["body"])


def test_a_nan_in_a_tensor_is_refused():
    hidden = randn(2, 5, 16)
    hidden[1, 2, 3] = float("nan")
    with pytest.raises(MalformedMessage, match=r"body.hidden.data \(float32, shape \[2, 5, 16\]\) holds NaN or inf"):
        decode(encode("forward", Activations(0, 0, pack(hidden, "fp32"), torch.ones(2, 5, dtype=torch.long), None)))


def test_an_array_of_another_shape_or_dtype_than_its_body_says_is_refused():
    record = encode("forward", MESSAGES["activations fp32"])
    key = body_of(record)["fields"]["hidden"]["fields"]["data"]["$tensor"]
    arrays = dict(record[ARRAYS].items())
    arrays[key] = Array(np.zeros((2, 5, 15), dtype=np.float32))
    with pytest.raises(MalformedMessage, match=r"has shape \[2, 5, 15\] on the wire where its body says \[2, 5, 16\]"):
        decode(tampered(record, arrays=ArrayRecord(arrays)))
    arrays[key] = Array(np.zeros((2, 5, 16), dtype=np.float64))
    with pytest.raises(MalformedMessage, match="is float64 on the wire where its body says float32"):
        decode(tampered(record, arrays=ArrayRecord(arrays)))


def test_a_payload_that_disagrees_with_its_message_type_is_refused():
    with pytest.raises(MalformedMessage, match="attention mask is not"):
        decode(encode("forward", Activations(0, 0, randn(2, 5, 16), torch.ones(2, 4, dtype=torch.long), None)))
    with pytest.raises(MalformedMessage, match="a int8 payload is torch.float32"):
        decode(encode("forward", MiddleActivations(0, 0, dataclasses.replace(pack(randn(1, 2, 4), "int8"),
                                                                             data=randn(1, 2, 4)))))  # fmt: skip
    with pytest.raises(MalformedMessage, match="rank differs"):
        decode(encode("upload", AdapterUpload(0, 1, {"q": AdapterFactors(0, 1, randn(4, 16), randn(24, 3), 2.0)})))


def test_unknown_types_missing_fields_and_stray_arrays_are_refused():
    record = encode("plan", MESSAGES["plan"])
    body = body_of(record)
    with pytest.raises(MalformedMessage, match="'Exploit' message, which this codec does not know"):
        decode(tampered(record, body={**body, "$message": "Exploit"}))
    del body["fields"]["ranks"]
    with pytest.raises(MalformedMessage, match=r"\(RoundPlan\) lacks field\(s\) ranks"):
        decode(tampered(record, body=body))
    with pytest.raises(MalformedMessage, match="tagged '\\$pickle'"):
        decode(tampered(record, body={"$pickle": "gASV"}))
    with pytest.raises(MalformedMessage, match="arrays its body never names: t9"):
        decode(tampered(record, arrays=ArrayRecord({"t9": Array(np.zeros(2, dtype=np.float32))})))
    with pytest.raises(MalformedMessage, match="answers call 'plan', not 'forward'"):
        decode(record, "forward")
    with pytest.raises(MalformedMessage, match="no 'call' record"):
        decode(RecordDict({ARRAYS: ArrayRecord()}))


def test_a_pickled_array_is_not_unpickled():
    record = encode("weights", {"w": randn(2, 2)})
    payload = pickle.dumps(np.array([object()], dtype=object))
    arrays = ArrayRecord({"t0": Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=payload)})
    with pytest.raises(MalformedMessage, match="is not a numpy array"):
        decode(tampered(record, arrays=arrays))


def test_an_object_not_yet_uploaded_is_asked_for_again_within_milliseconds():
    """A message's header arrives before its arrays; Flower asks again for an array not yet there
    after 1 s (every message pulled early waited that long). The Flower processes this project
    starts ask again from OBJECT_RETRY_S on, with no cap on the tries (its max_time bounds them)."""
    import time

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from hsplitlora.engines.flower_local import OBJECT_RETRY_MAX_S, quicker_object_pulls

    saved = {f: dict(f.__kwdefaults__) for f in (inflatable_utils.pull_objects,
                                                  inflatable_utils.pull_and_inflate_object_from_tree)}  # fmt: skip
    try:
        quicker_object_pulls()
        asked: list[float] = []

        def pull(object_id: str) -> bytes:
            asked.append(time.monotonic())
            if len(asked) < 3:
                raise ObjectUnavailableError(object_id)
            return b"arrays"

        assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"arrays"}
        assert asked[-1] - asked[0] < OBJECT_RETRY_MAX_S  # Flower's own: at least 0.8 + 1.6 s
        assert inflatable_utils.pull_objects.__kwdefaults__["max_tries_per_object"] is None
    finally:
        for function, defaults in saved.items():
            function.__kwdefaults__.clear()
            function.__kwdefaults__.update(defaults)
