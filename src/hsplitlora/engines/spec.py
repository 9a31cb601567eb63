"""What a host in another process needs to build its role: the model to load its blocks from,
the training settings and the devices. One typed spec, JSON-serialisable, shared by the engines
whose hosts live elsewhere and by the one process's hosts (engines/hosts.py builds every role from
it); a Ray actor gets the object, a Flower ClientApp its JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from hsplitlora.errors import MalformedMessage
from hsplitlora.privacy.dp import NO_DP, DPSettings


@dataclass(frozen=True)
class HostSpec:
    model: str
    seed: int
    targets: list[str] | str
    batch_size: int
    pad_id: int
    lr: float
    alpha: float
    num_blocks: int
    compression: str
    tail_blocks: int | None
    dtype: str
    client_quant: str
    server_quant: str
    client_device: str
    server_device: str
    threads: int | None
    dp: DPSettings = NO_DP  # the run's differential privacy, sigmas calibrated
    lora_scaling: str = "standard"  # standard (alpha / r) or rslora (alpha / sqrt(r))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> HostSpec:
        """The spec `to_json` wrote; one sentence when the text is not one."""
        try:
            values = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            raise MalformedMessage("the host spec is not JSON.") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise MalformedMessage(f"the host spec has keys {got}, not {sorted(names)}.")
        try:
            dp = DPSettings(**values.pop("dp"))
        except TypeError:
            raise MalformedMessage("the host spec's dp is not the JSON of DPSettings.") from None
        return cls(**values, dp=dp)


def host_spec(config, pad_id: int, num_blocks: int, where, dp=None) -> HostSpec:
    """The spec of a run's hosts: `config` (RunConfig) with the tokenizer's padding id, the
    model's block count, the placement's devices and the run's DP (`DPSettings`, sigmas calibrated)."""
    targets = config.targets if isinstance(config.targets, str) else list(config.targets)
    return HostSpec(
        model=config.model, seed=config.seed, targets=targets, batch_size=config.batch_size, pad_id=pad_id,
        lr=config.lr, alpha=config.alpha, num_blocks=num_blocks, compression=config.compression,
        tail_blocks=config.tail, dtype=config.dtype, client_quant=config.client_quant,
        server_quant=config.server_quant, client_device=str(where.client), server_device=str(where.server),
        # Steps are sequential (client, server, client), so each host may use every core.
        threads=config.threads or os.cpu_count(), dp=dp if dp is not None else NO_DP,
        lora_scaling=config.lora_scaling,
    )  # fmt: skip
