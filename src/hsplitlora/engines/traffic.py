"""What every engine does the same way: count the bytes that cross between roles per client, and
run local steps."""

from __future__ import annotations

from collections.abc import Callable

TRAFFIC = ("activations", "gradients", "activations_down", "gradients_up", "adapters_up", "adapters_down")
CUT = ("activations", "gradients", "activations_down", "gradients_up")  # every split step's messages
UP = ("activations", "gradients_up", "adapters_up")


class TrafficLedger:
    """Per client, for the current round: activations at the cut and adapters up, gradients at the
    cut and updates down; in a U-shaped split also the middle's activations down and their
    gradients up."""

    traffic: dict[int, dict[str, int]]
    events: list[dict]

    def start_ledger(self, client_ids) -> None:
        self.traffic = {cid: dict.fromkeys(TRAFFIC, 0) for cid in client_ids}
        self.events = []  # what went wrong this round (the Ray engine logs lost clients)
        self.round_steps = 0  # local steps run this round
        self.server_adapters_down = 0  # the update sent to the main server (its own link, outside the clients')

    @property
    def bytes_up(self) -> dict[int, int]:
        return {cid: sum(v for k, v in t.items() if k in UP) for cid, t in self.traffic.items()}

    @property
    def bytes_down(self) -> dict[int, int]:
        return {cid: sum(v for k, v in t.items() if k not in UP) for cid, t in self.traffic.items()}

    def step_bytes(self, client_id: int) -> int:
        """This round's bytes of split steps (both directions) for one client."""
        return sum(self.traffic[client_id][k] for k in CUT)

    def add_traffic(self, client_id: int, counts: dict[str, int]) -> None:
        for category, nbytes in counts.items():
            self.traffic[client_id][category] += nbytes

    def reset_traffic(self) -> None:
        """A new round's ledger; events not yet reported (a client lost while the last round's
        checkpoint was taken) carry over into this round's report."""
        events = self.events
        self.start_ledger(list(self.traffic))
        self.events = events

    def step_all(self) -> list[float | None]:
        """One local step of every client; its loss (None for a client lost during the step)."""
        raise NotImplementedError

    def local_steps(
        self, steps: int, on_step: Callable[[int, list[float | None]], None] | None = None
    ) -> list[list[float | None]]:
        """`steps` local steps of every client; the losses, one list per step."""
        history = []
        for step in range(steps):
            self.round_steps += 1
            losses = self.step_all()
            history.append(losses)
            if on_step is not None:
                on_step(step, losses)
        return history
