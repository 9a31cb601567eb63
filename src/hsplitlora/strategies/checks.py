"""The settings a strategy's capabilities refuse: a cut for a strategy that runs the model whole,
ranks for full fine-tuning, several ranks where factors are averaged, ..."""

from __future__ import annotations

from hsplitlora.config import FLOWER, RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.strategies import STRATEGIES


def check_strategy_settings(config: RunConfig, given: set[str] | None = None) -> None:
    """Raise UsageError on the first setting `config.strategy` cannot follow; with `given` (the
    settings set explicitly), also on one it would ignore."""
    if config.strategy not in STRATEGIES:
        raise UsageError(f"strategy {config.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}.")
    strategy, name = STRATEGIES[config.strategy], config.strategy
    if config.engine == FLOWER and strategy.centralised:
        raise UsageError(f"{name} trains one model on pooled data; the flower engine runs federated strategies "
                         "(each client on its own node); use engine inprocess for it.")  # fmt: skip
    if config.split_mode == "u" and not strategy.splits:
        splitting = ", ".join(key for key, cls in STRATEGIES.items() if cls.splits)
        raise UsageError(f"split_mode u needs a strategy that splits the model, and {name} runs it whole on every "
                         f"client; choose one of {splitting}.")  # fmt: skip
    if config.split_point is not None and not strategy.splits:
        raise UsageError(f"split_point fixes where the model is cut, and {name} runs it whole on every client; "
                         "drop split_point or choose a strategy that splits.")  # fmt: skip
    ranks = set(config.per_client("rank")) if config.rank is not None else set()
    if ranks and strategy.full_finetune:
        raise UsageError(f"rank sets LoRA ranks, and {name} trains every weight, without adapters; drop it.")
    if len(ranks) > 1 and strategy.centralised:
        raise UsageError(f"{name} is a centralised reference: one trainer on the pooled data, with one rank; got "
                         f"ranks {config.per_client('rank')}: give one value.")  # fmt: skip
    if len(ranks) > 1 and strategy.aggregation.one_rank:
        raise UsageError(f"{name} averages the factors of all clients, so they need one rank; got ranks "
                         f"{config.per_client('rank')}: give one value.")  # fmt: skip
    quantized = [key for key in ("client_quant", "server_quant") if getattr(config, key) != "none"]
    if quantized and strategy.full_finetune:
        raise UsageError(f"{quantized[0]} {getattr(config, quantized[0])} holds the frozen weights in fewer bits, "
                         f"and {name} trains every weight; drop {quantized[0]} or choose a LoRA strategy.")  # fmt: skip
    if given is not None and "lora_scaling" in given and strategy.full_finetune:
        raise UsageError(f"lora_scaling {config.lora_scaling} sets the adapters' scale, and {name} trains every weight "
                         "without adapters; drop lora_scaling or choose a LoRA strategy.")  # fmt: skip
    if config.dp_sgd and strategy.full_finetune:
        raise UsageError(f"DP-SGD here privatises the adapters' gradients, and {name} trains every weight without "
                         "adapters; choose a LoRA strategy or drop dp_sgd_sigma / dp_epsilon.")  # fmt: skip
    if config.dp_activations and (not strategy.splits or strategy.centralised):
        raise UsageError(f"DP on the activations noises what crosses the cut, and {name} runs the model whole, so "
                         "nothing crosses; choose a strategy that splits or drop the activation noise.")  # fmt: skip
    if max(config.rank_levels) == 0 and config.rank is None and not strategy.full_finetune:
        raise UsageError(f"rank_levels {config.rank_levels} hold no positive rank, so every adapter gets rank 0 and "
                         "nothing would be trained; add positive levels, like 0,2,4,8,16.")  # fmt: skip
    if config.rank_time_slack is not None and not strategy.times_ranks:
        timing = ", ".join(key for key, cls in STRATEGIES.items() if cls.times_ranks)
        raise UsageError(f"rank_time_slack {config.rank_time_slack} lets the time model lower ranks, and {name} sets "
                         f"its ranks otherwise; drop rank_time_slack or choose one of {timing}.")  # fmt: skip
    if config.recompute != "off" and not strategy.splits:
        raise UsageError(f"recompute {config.recompute} recomputes a split client's blocks in backward, and "
                         f"{name} runs the model whole on every client; drop recompute or choose a strategy that "
                         "splits.")  # fmt: skip
    if config.recompute != "off" and config.dp_sgd:
        raise UsageError(f"recompute {config.recompute} runs the client's blocks twice, and DP-SGD records every "
                         "example's activations as they run; drop recompute or DP-SGD.")  # fmt: skip
    if config.rank_time_slack is not None and (config.rank is not None or config.split_point is not None):
        fixed = "rank" if config.rank is not None else "split_point"
        raise UsageError(f"rank_time_slack {config.rank_time_slack} lets the planner lower ranks, and {fixed} fixes "
                         f"the plan; drop one of the two.")  # fmt: skip
    if given is not None and "adapter_lifecycle" in given and not strategy.adapter_lifecycles:
        having = ", ".join(key for key, cls in STRATEGIES.items() if cls.adapter_lifecycles)
        raise UsageError(f"adapter_lifecycle sets what HSplitLoRA's adapters do across rounds, and {name} has a "
                         f"fixed life cycle of its own; drop adapter_lifecycle or choose one of {having}.")  # fmt: skip
