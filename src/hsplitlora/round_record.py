"""What a run records: one metrics.jsonl line per round and summary.json at the end."""

from __future__ import annotations

import numpy as np

from hsplitlora.config import RunConfig
from hsplitlora.method.planner import Plan


def mean_present(values: list[float | None]) -> float | None:
    """Mean over the values that exist (a client lost during a round has no loss)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def round_line(
    config: RunConfig, round_: int, plan: Plan, history: list[list[float | None]], engine, timing: dict,
    losses: dict, times: dict, planning: dict, sampled: list[int] | None = None,
) -> dict:  # fmt: skip
    """The round's metrics.jsonl line: losses, simulated and wall time, bytes, what went wrong, and
    per client its cut, ranks, memory, samples, loss, time and bytes; with client sampling on
    (`sampled`: the clients that trained), which clients those were."""
    counters = engine.round_counters()
    drawn = {} if sampled is None else {"sampled_clients": list(sampled)}  # absent: every client trained
    return {
        "round": round_,
        "strategy": config.strategy,
        "split_mode": config.split_mode,
        **losses,
        "sim_time_s": times["sim_time_s"],
        "round_sim_time_s": timing["round_s"],
        "server_busy_s": timing["server_busy_s"],
        "wall_time_s": times["wall_time_s"],
        "round_wall_time_s": times["round_wall_time_s"],
        "bytes_up": sum(engine.bytes_up.values()),
        "bytes_down": sum(engine.bytes_down.values()),
        "replanned": planning["replanned"],
        "events": [dict(e, round=round_) for e in engine.events],
        "kendall_distance": planning["kendall_distance"],
        "smoothing_gamma": planning["smoothing_gamma"],
        **drawn,
        "clients": [
            {
                "client": c.client,
                "split_point": c.split_point,
                "tail_blocks": config.tail,
                "client_rank_total": sum(c.ranks.values()),
                "client_adapters": sum(1 for r in c.ranks.values() if r),
                "server_rank_total": sum(c.server_ranks.values()),
                "predicted_bytes": c.predicted_bytes,
                "budget_bytes": c.budget_bytes,
                "server_predicted_bytes": c.server_predicted_bytes,  # the main server's memory for it
                **({"recompute": True} if c.recompute else {}),  # its front recomputes its activations
                "samples": counters[c.client]["samples"],
                "train_loss": mean_present([step[c.client] for step in history]),
                "sim_time_s": timing["client_s"][c.client],
                **{f"bytes_{k}": v for k, v in engine.traffic[c.client].items()},
            }
            for c in plan.clients
        ],
    }


def run_summary(config: RunConfig, metrics: list[dict], sim_time: float, data_description: str) -> dict:
    """summary.json: final and best validation perplexity, time, bytes, peak predicted memory."""
    evaluated = [m for m in metrics if m["val_ppl"] is not None]
    return {
        "strategy": config.strategy,
        "model": config.model,
        "rounds": config.rounds,
        "final_val_loss": evaluated[-1]["val_loss"] if evaluated else None,
        "final_val_ppl": evaluated[-1]["val_ppl"] if evaluated else None,
        "best_val_ppl": min((m["val_ppl"] for m in evaluated), default=None),
        "sim_time_s": sim_time,
        "wall_time_s": metrics[-1]["wall_time_s"] if metrics else 0.0,
        "bytes_up": sum(m["bytes_up"] for m in metrics),
        "bytes_down": sum(m["bytes_down"] for m in metrics),
        "peak_client_predicted_bytes": max(c["predicted_bytes"] for m in metrics for c in m["clients"]),
        "data": data_description,
    }
