"""Where each role computes: `device` for everything, or `client_device` and `server_device` apart
(the main server on a GPU, clients on the CPU, as a deployment would be). Placed once at setup;
messages carry tensors from one device to the other; the fed server aggregates on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplitlora.errors import UsageError

KINDS = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Placement:
    client: torch.device
    server: torch.device

    @property
    def separate(self) -> bool:
        """Whether clients and the main server compute on different devices (two model copies)."""
        return self.client != self.server


def parse_device(name: str, what: str = "device") -> torch.device:
    """cpu, cuda, cuda:N or mps as a torch.device (one sentence for anything else)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{what} {name!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if device.type not in KINDS:
        raise UsageError(f"{what} {name!r} is not supported; use cpu, cuda, cuda:N or mps.")
    return device


def check_available(device: torch.device, what: str = "device") -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"{what} {device} is not available: torch sees {count} CUDA device(s) on this machine; "
                             "use cpu, or a GPU machine with a CUDA build of torch.")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{what} mps is not available on this machine; use cpu.")


def placement(device: str, client_device: str | None, server_device: str | None, check: bool = True) -> Placement:
    """The devices of clients and main server: each defaults to `device`."""
    client = parse_device(client_device or device, "client_device" if client_device else "device")
    server = parse_device(server_device or device, "server_device" if server_device else "device")
    if check:
        check_available(client, "client_device" if client_device else "device")
        check_available(server, "server_device" if server_device else "device")
    return Placement(client, server)
