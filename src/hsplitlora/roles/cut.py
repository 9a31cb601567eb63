"""The cut: everything that crosses between one client and the main server (activations, their
gradients, the mask and the labels, in both split modes, in training and validation) passes one
`Cut`, the boundary codec of that client. The sender hands it a message holding its tensor and
gets the message as it goes on the wire; the receiver hands it the wire message and gets the
tensor it computes with.

A cut is a pipeline of stages run on every message sent: the run's compression (`Compress`),
and whatever joins it with `add`: a transform of the sender's tensors before compression (noise
on activations), or an observer of the wire form after it (an audit, a `Recorder`). In one
process both ends hold the same `Cut`; elsewhere (Ray) each end holds a copy built from the same
compression.

It also counts the bytes on the client's link, by ledger category (engines/traffic.py), at the
client's end: what the client sends when sent, what it receives when received, so the count is
whole in whichever process the client lives."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol, TypeVar

import torch

from hsplitlora.compression import Packed, check_mode, pack
from hsplitlora.config import DEFAULT_COMPRESSION
from hsplitlora.roles.messages import ActivationGradient, Activations, MiddleActivations, TailGradient

CutMessage = Activations | ActivationGradient | MiddleActivations | TailGradient
M = TypeVar("M", Activations, ActivationGradient, MiddleActivations, TailGradient)

PAYLOAD = {Activations: "hidden", MiddleActivations: "hidden", ActivationGradient: "grad", TailGradient: "grad"}
SENT_BY_CLIENT = {Activations: "activations", TailGradient: "gradients_up"}
SENT_BY_SERVER = {ActivationGradient: "gradients", MiddleActivations: "activations_down"}


class Stage(Protocol):
    """One step of a cut's pipeline: returns the message to pass on (the same one to observe)."""

    def __call__(self, message: M, validation: bool) -> M: ...


class Compress:
    """The run's compression of the payload (compression.py). Validation's messages cross at full
    precision: the loss it reports is the model's, not the codec's."""

    def __init__(self, mode: str = DEFAULT_COMPRESSION):
        self.mode = check_mode(mode)

    def __call__(self, message: M, validation: bool) -> M:
        name = PAYLOAD[type(message)]
        return replace(message, **{name: pack(getattr(message, name), "fp32" if validation else self.mode)})


class Recorder:
    """An observer stage: keeps every message it is given, with whether it was validation's."""

    def __init__(self) -> None:
        self.messages: list[tuple[CutMessage, bool]] = []

    def __call__(self, message: M, validation: bool) -> M:
        self.messages.append((message, validation))
        return message


class Cut:
    """One client's boundary with the main server: its stages (compression first) and the bytes
    on its link this step."""

    def __init__(self, compression: str = DEFAULT_COMPRESSION):
        self.compression = check_mode(compression)
        self.stages: list[Stage] = [Compress(compression)]
        self.counts: dict[str, int] = {}

    def add(self, stage: Stage, wire: bool = True) -> None:
        """Join `stage` to every message sent: after compression (`wire`: it sees what crosses),
        or before it (it sees and may change the sender's tensors)."""
        compress = next(i for i, known in enumerate(self.stages) if isinstance(known, Compress))
        self.stages.insert(len(self.stages) if wire else compress, stage)

    def send(self, message: M, validation: bool = False) -> M:
        """The message as it crosses: its payload detached (the sender keeps its graph) and passed
        through every stage; counted when the client sends it (training only)."""
        name = PAYLOAD[type(message)]
        message = replace(message, **{name: getattr(message, name).detach()})
        for stage in self.stages:
            message = stage(message, validation)
        if not validation and type(message) in SENT_BY_CLIENT:
            self._count(SENT_BY_CLIENT[type(message)], message.nbytes())
        return message

    def receive(
        self, message: CutMessage, dtype: torch.dtype, device: torch.device | str, validation: bool = False
    ) -> torch.Tensor:
        """The payload the receiver computes with, in `dtype` on `device`; counted when the client
        receives it (training only)."""
        if not validation and type(message) in SENT_BY_SERVER:
            self._count(SENT_BY_SERVER[type(message)], message.nbytes())
        payload: Packed = getattr(message, PAYLOAD[type(message)])
        return payload.unpack(dtype, device)

    def begin_step(self) -> None:
        """A step starts with its activations: the count starts again (a step abandoned half-way,
        its main server lost, is not counted)."""
        self.counts = {}

    def take_counts(self) -> dict[str, int]:
        """The bytes counted since the step began, by ledger category; the count starts again."""
        counts, self.counts = self.counts, {}
        return counts

    def _count(self, category: str, nbytes: int) -> None:
        self.counts[category] = self.counts.get(category, 0) + nbytes
