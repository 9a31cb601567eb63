"""Device profiles: memory budget (bytes), compute speed (FLOP/s) and link bandwidth (bytes/s) per
client, from named presets, explicit budgets, or per-client overrides (method.md section 5)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hsplitlora.errors import UsageError
from hsplitlora.units import parse_budgets, parse_bytes


@dataclass(frozen=True)
class DeviceProfile:
    budget_bytes: int
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s

    def to_dict(self) -> dict:
        return asdict(self)


def _device(budget: str, gflops: float, mbps: float) -> DeviceProfile:
    return DeviceProfile(parse_bytes(budget), gflops * 1e9, mbps * 1e6 / 8)


# Budgets are sized for SmolLM2-135M at batch 8 x 128 tokens (float32): the five heterogeneous
# devices get split points 2, 4, 7, 11 and 17 from the planner.
PRESETS: dict[str, list[DeviceProfile]] = {
    "hetero5": [
        _device("300MB", 50, 20),  # a low-end phone on a slow link
        _device("400MB", 100, 50),
        _device("600MB", 200, 100),
        _device("800MB", 400, 200),
        _device("1.2GB", 800, 500),  # an edge box
    ],
    "homo5": [_device("600MB", 200, 100)] * 5,
}
DEFAULT_PRESET = "hetero5"
# The main server: memory for all clients together, FLOP/s.
SERVER = {"budget": "16GB", "flops": 20e12}
DEFAULT_FLOPS = 200e9
DEFAULT_BANDWIDTH = 100e6 / 8


def _positive_number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise UsageError(f"{name} must be a positive number, got {value!r}.")
    return number


def resolve_devices(
    clients: int,
    budgets: str | list | None = None,
    preset: str | None = None,
    overrides: dict | None = None,
) -> list[DeviceProfile]:
    """One profile per client: explicit `budgets` (with default speed and bandwidth), else the
    preset (repeated cyclically when there are more clients than its devices); then per-client
    overrides `{client_id: {budget|flops|bandwidth: value}}`."""
    if budgets is not None:
        values = parse_budgets(",".join(map(str, budgets)) if isinstance(budgets, list) else str(budgets))
        if len(values) == 1:
            values = values * clients
        if len(values) != clients:
            raise UsageError(
                f"budgets lists {len(values)} sizes but there are {clients} clients; give one or exactly {clients}."
            )
        devices = [DeviceProfile(v, DEFAULT_FLOPS, DEFAULT_BANDWIDTH) for v in values]
    else:
        name = preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise UsageError(f"device preset {name!r} is unknown; choose one of {', '.join(PRESETS)}.")
        devices = [PRESETS[name][i % len(PRESETS[name])] for i in range(clients)]
    for key, change in (overrides or {}).items():
        client = int(key) if str(key).lstrip("-").isdigit() else None
        if client is None or not 0 <= client < clients:
            raise UsageError(f"device override for client {key!r} names no client; clients are 0..{clients - 1}.")
        if not isinstance(change, dict):
            raise UsageError(f"device override for client {client} must map budget/flops/bandwidth to values.")
        unknown = set(change) - {"budget", "flops", "bandwidth"}
        if unknown:
            raise UsageError(
                f"device override key {sorted(map(str, unknown))[0]!r} is unknown; use budget, flops, bandwidth."
            )
        old = devices[client]
        devices[client] = DeviceProfile(
            parse_bytes(change["budget"]) if "budget" in change else old.budget_bytes,
            _positive_number(f"flops of client {client}", change.get("flops", old.flops)),
            _positive_number(f"bandwidth of client {client}", change.get("bandwidth", old.bandwidth)),
        )
    return devices
