"""Memory sizes as people write them (`800MB`, `1.5GB`, `2GiB`, bytes; B is a byte, a lowercase b a
bit, refused) and as people read them (decimal units)."""

from __future__ import annotations

import math

from hsplitlora.errors import UsageError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_bytes(text: str | int) -> int:
    """`800MB`, `1.5GB`, `2GiB`, `123456` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    raw = str(text).strip()
    lowered = raw.lower().replace(" ", "")
    number = lowered.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = lowered[len(number) :] or "b"
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    written_unit = raw.replace(" ", "")[len(number) :]
    if written_unit.endswith("b") and unit in _UNITS and math.isfinite(value) and value > 0:
        bytes_unit = written_unit[:-1].upper().replace("I", "i") + "B"
        raise UsageError(f"budget {raw!r} is in bits (a lowercase b means bits); memory sizes are in bytes: write "
                         f"{number}{bytes_unit}.")  # fmt: skip
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise UsageError(
            f"budget {raw!r} is not a memory size; write a positive number with an optional unit, "
            "like 800MB, 1.5GB, 2GiB or 123456 (bytes)."
        )
    return int(value * _UNITS[unit])


def parse_budgets(text: str) -> list[int]:
    parts = str(text).split(",")
    if not all(part.strip() for part in parts):
        raise UsageError(f"budgets {text!r} has an empty entry; list memory sizes like 1.5GB,2GB,3GB.")
    return [parse_bytes(part) for part in parts]


def format_bytes(value: float) -> str:
    """Decimal units, as budgets are written: 10GB reads back as `10 GB`, 1.5GB as `1.5 GB`."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(value) >= size:
            return f"{f'{value / size:.2f}'.rstrip('0').rstrip('.')} {unit}"
    return f"{int(value)} B"
