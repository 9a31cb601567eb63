"""Bytes that cross between roles, per client: what every engine counts the same way."""

from __future__ import annotations

TRAFFIC = ("activations", "gradients", "adapters_up", "adapters_down")


class TrafficLedger:
    """Per client: activations and adapters up, gradients and updates down, for the current round."""

    traffic: dict[int, dict[str, int]]
    events: list[dict]

    def start_ledger(self, client_ids) -> None:
        self.traffic = {cid: dict.fromkeys(TRAFFIC, 0) for cid in client_ids}
        self.events = []  # what went wrong this round (the Ray engine logs lost clients)

    @property
    def bytes_up(self) -> dict[int, int]:
        return {cid: t["activations"] + t["adapters_up"] for cid, t in self.traffic.items()}

    @property
    def bytes_down(self) -> dict[int, int]:
        return {cid: t["gradients"] + t["adapters_down"] for cid, t in self.traffic.items()}

    def reset_traffic(self) -> None:
        self.start_ledger(list(self.traffic))
