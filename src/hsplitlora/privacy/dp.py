"""Differential privacy at the cut and on the adapters (method.md section 10).

Two mechanisms, each a Gaussian mechanism on one example at a time:

- **On the activations** (`ActivationNoise`, a stage of the client's `Cut` before compression):
  each example's activation tensor at the cut, all its tokens, clipped to L2 norm `C`, then
  N(0, sigma^2 C^2) added to every coordinate before it leaves the client. Training's messages
  only: validation runs on the evaluator's rows, not on a client's shard.
- **DP-SGD on the adapters** (`DPSGD`): per example, the gradient of every adapter trained on that
  client's data clipped, summed, N(0, sigma^2 C^2) added, divided by the batch size. The adapters
  of one client live on two hosts (the client's blocks and its adapters on the main server), so
  each host clips its share to C / sqrt(2) (C alone when the client runs the whole model): the
  joint per-example gradient then has norm at most C. Each host adds N(0, sigma^2 C^2), with the
  whole C, to each of its own coordinates (the hosts' coordinates are disjoint, so their noise does
  not add up): the joint step is the Gaussian mechanism of DP-SGD with group-wise clipping.
  Per-example gradients of A and B are computed in closed form from what the LoRA layer keeps of
  its forward (its input x, x A^T) and the gradient at its output (lora/layer.py, `per_example`).
  A noisy step may span several batches (`batches`, DP-SGD's logical batch): each batch's
  examples are clipped and summed as they come, the noise is added once to the sum over all of
  them, and only then does the optimizer step; the accountant's sampling rate is the logical
  batch over the shard and its steps the noisy steps.

The loss a DP-SGD step back-propagates is the sum of each example's token losses over the batch
size (not over the batch's token count, which would make one example's gradient depend on the
others'). The accountant (`epsilon`) is Opacus's RDP accountant; a target epsilon calibrates
sigma (`calibrate`). Each role's noise comes from its own generator, saved with its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from hsplitlora.errors import MalformedMessage, UsageError


@dataclass(frozen=True)
class DPSettings:
    """One run's DP: sigma 0 turns a mechanism off. `activation_clip` is C on the activations,
    `grad_clip` C on the adapters' per-example gradients."""

    activation_sigma: float = 0.0
    activation_clip: float | None = None
    sgd_sigma: float = 0.0
    grad_clip: float = 1.0
    sgd_batches: int = 1  # batches per DP-SGD step (its logical batch)
    seed: int = 0
    # The most steps a client takes over the run (what a target epsilon was calibrated for): the
    # accountant's count for a client whose own count is lost (its host lost in the last round).
    planned_sgd_steps: int = 0
    planned_activation_steps: int = 0

    @property
    def activations(self) -> bool:
        return self.activation_sigma > 0

    @property
    def sgd(self) -> bool:
        return self.sgd_sigma > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


NO_DP = DPSettings()


def planned_settings(config, shard_sizes: list[int], batches: int, activation_steps: int) -> DPSettings:
    """The run's DP, a target epsilon calibrated to a sigma: the largest any client needs (its
    sampling rate and its delta) to stay within the target over the planned steps, so no client
    exceeds it. `batches`: the training batches a client takes at most over the run (DP-SGD's
    steps are these over `dp_batches`)."""
    sgd_steps = batches // config.dp_batches

    def sigma(given: float, target: float | None, steps: int, examples: int) -> float:
        if target is None:
            return given
        needed = {calibrate(target, examples / n, steps, delta_of(config, n)) for n in set(shard_sizes)}
        return max(needed)

    logical = config.batch_size * config.dp_batches
    return DPSettings(
        activation_sigma=sigma(config.dp_activations_sigma, config.dp_activations_epsilon, activation_steps,
                               config.batch_size),
        activation_clip=config.dp_clip, sgd_sigma=sigma(config.dp_sgd_sigma, config.dp_epsilon, sgd_steps, logical),
        grad_clip=config.dp_grad_clip, sgd_batches=config.dp_batches, seed=config.seed, planned_sgd_steps=sgd_steps,
        planned_activation_steps=activation_steps,
    )  # fmt: skip


def delta_of(config, shard_size: int) -> float:
    """The delta of a client's epsilon: the setting, else 1 / its shard size."""
    return config.dp_delta if config.dp_delta is not None else 1.0 / max(shard_size, 1)


def client_epsilons(config, dp: DPSettings, shard_sizes: list[int], counters: list[dict]) -> list[dict]:
    """Each client's (epsilon, delta) of each mechanism over the steps it took (Opacus RDP); a
    client whose count is lost (`counters` without it) at the planned steps, an upper bound."""
    rows = []
    for cid, (n, counts) in enumerate(zip(shard_sizes, counters, strict=True)):
        q, delta = config.batch_size / n, delta_of(config, n)
        row = {"client": cid, "shard_size": n, "sample_rate": q, "delta": delta}
        if dp.activations:
            steps = counts.get("dp_activation_steps", dp.planned_activation_steps)
            row["activations"] = {"sigma": dp.activation_sigma, "clip": dp.activation_clip, "steps": steps,
                                  "epsilon": epsilon(dp.activation_sigma, q, steps, delta)}  # fmt: skip
        if dp.sgd:
            steps, q_sgd = counts.get("dp_sgd_steps", dp.planned_sgd_steps), q * dp.sgd_batches
            row["sgd"] = {"sigma": dp.sgd_sigma, "clip": dp.grad_clip, "steps": steps, "batches": dp.sgd_batches,
                          "sample_rate": q_sgd, "epsilon": epsilon(dp.sgd_sigma, q_sgd, steps, delta)}  # fmt: skip
        rows.append(row)
    return rows


def noise_generator(seed: int, role: str, client_id: int, restart: int = 0) -> torch.Generator:
    """A role's own noise stream for one client ("activations" or "client" or "server"). A
    restarted client draws from the stream of its restart's key (> 0; see `LostRound`), which no
    earlier step used."""
    salt = {"activations": 1, "client": 2, "server": 3}[role]
    if restart <= 0:
        return torch.Generator().manual_seed((seed * 1_000_003 + client_id * 7_919 + salt * 104_729) % 2**63)
    digest = hashlib.sha256(f"hsplitlora-dp/{seed}/{role}/{client_id}/restart/{restart}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def fresh_stream(state: torch.Tensor, key: int) -> torch.Tensor:
    """A generator state for a stream no step drew from: seeded from a generator's saved `state`
    and a `key` (the driver moves a role's noise on without knowing the run's seed)."""
    digest = hashlib.sha256(state.numpy().tobytes() + f"/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63).get_state()


@dataclass(frozen=True)
class LostRound:
    """What a restarted client's DP must catch up on: it comes back to its snapshot (taken when its
    last round was configured), which knows neither the steps it took since nor where its noise had
    got to. `steps` is an upper bound on the batches the driver sent it since the snapshot (the one
    in flight included), `stream` the key of the noise stream it draws from now on (the driver's:
    a round and a count, never used before by that client). Its counters then count those batches
    (the accountant over-counts by at most the one in flight), and replaying the old noise on
    activations of newer weights, which would release their difference un-noised, cannot happen."""

    steps: int
    stream: int

    def to_dict(self) -> dict:
        return {"steps": self.steps, "stream": self.stream}

    @classmethod
    def from_dict(cls, values) -> LostRound:
        try:
            steps, stream = values["steps"], values["stream"]
        except (TypeError, KeyError):
            raise MalformedMessage(f"a restart's lost round is not {{steps, stream}}: {values!r}.") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (steps, stream)):
            raise MalformedMessage(f"a restart's lost round needs counts >= 0, not {values!r}.")
        return cls(steps, stream)


def clip_per_example(tensor: torch.Tensor, clip: float) -> torch.Tensor:
    """Each example (first dimension) scaled to L2 norm at most `clip`."""
    flat = tensor.reshape(tensor.shape[0], -1)
    norms = flat.norm(dim=1)
    factors = (clip / (norms + 1e-12)).clamp(max=1.0)
    return tensor * factors.view(-1, *([1] * (tensor.dim() - 1))).to(tensor.dtype)


class ActivationNoise:
    """A cut stage before compression: clips each example of the client's activations at the cut
    to `clip` and adds N(0, (sigma clip)^2) to every coordinate (training only). The noise is
    drawn on the CPU from the stage's own generator, so a seed gives the same noise on any device."""

    def __init__(self, sigma: float, clip: float, generator: torch.Generator):
        self.sigma, self.clip, self.generator = sigma, clip, generator
        self.steps = 0  # training messages noised: the accountant's steps

    def state(self) -> dict[str, torch.Tensor]:
        return {"rng": self.generator.get_state(), "steps": torch.tensor(self.steps)}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(tensors["rng"])
        self.steps = int(tensors["steps"])

    def __call__(self, message, validation: bool):
        from dataclasses import replace

        from hsplitlora.roles.messages import Activations

        if validation or not isinstance(message, Activations):
            return message
        hidden = message.hidden
        clipped = clip_per_example(hidden.float(), self.clip)
        noise = torch.randn(hidden.shape, generator=self.generator, dtype=torch.float32) * (self.sigma * self.clip)
        self.steps += 1
        return replace(message, hidden=(clipped + noise.to(hidden.device)).to(hidden.dtype))


def lora_layers(module: torch.nn.Module | None) -> list:
    from hsplitlora.lora.layer import MultiLoRALayer

    if module is None:
        return []
    return list({id(m): m for m in module.modules() if isinstance(m, MultiLoRALayer)}.values())


def keep_per_example(modules: Iterable[torch.nn.Module | None], enabled: bool) -> None:
    """Have every LoRA layer in `modules` keep what per-example gradients need (or stop)."""
    for module in modules:
        for layer in lora_layers(module):
            layer.record_per_example(enabled)


def drop_records(modules: Iterable[torch.nn.Module | None], adapter: str) -> None:
    """Forget what `adapter`'s layers kept from a step that never finished (its peer was lost)."""
    for module in modules:
        for layer in lora_layers(module):
            layer.take_per_example(adapter)


class DPSGD:
    """DP-SGD for the adapters one host trains for one client (see the module's docstring): a noisy
    step every `batches` batches. `clip` is C; with `hosts` hosts training the client's adapters,
    each clips its share to C / sqrt(hosts) and adds noise of scale sigma C."""

    def __init__(self, sigma: float, clip: float, generator: torch.Generator, batches: int = 1, hosts: int = 1):
        self.sigma, self.clip, self.generator, self.batches, self.hosts = sigma, clip, generator, batches, hosts
        self.steps = 0
        self.training = True  # the client trains adapters this round, on either host (not the warm-up)
        self.reset()

    def reset(self) -> None:
        """Forget the batches clipped since the last noisy step (a step its host will not finish:
        nothing of them was released)."""
        self.sums: dict[torch.nn.Parameter, torch.Tensor] = {}  # each factor's clipped sum so far
        self.pending = self.examples = 0

    @torch.no_grad()
    def privatize(self, modules: Iterable[torch.nn.Module | None], adapter: str, batch_size: int) -> bool:
        """Clip each example's gradient of `adapter`'s factors in `modules` (from the per-example
        gradients recorded since the last call) to this host's share of C and add them to the
        step's sum. Once the
        step has its `batches` batches, the factors' gradients become the sum plus noise over the
        examples it holds, and this returns True: the optimizer steps. Before that, their gradients
        are cleared and it returns False. (The recorded gradients are of the loss summed per
        example over the batch size, so they are multiplied back by it.)"""
        grads = per_example_gradients(modules, adapter)
        if not self.training:  # no adapter of the client trains (round 1's warm-up): nothing to release
            return True
        if grads:  # a host with no adapters for the client still counts the batch: the step is joint
            norms_sq = sum((g.reshape(g.shape[0], -1) * batch_size).pow(2).sum(1) for g in grads.values())
            factors = (host_clip(self.clip, self.hosts) / (norms_sq.sqrt() + 1e-12)).clamp(max=1.0)
        for param, grad in grads.items():
            per_example = grad * batch_size
            total = torch.einsum("b,b...->...", factors.to(per_example.dtype), per_example)
            self.sums[param] = self.sums[param] + total if param in self.sums else total
            param.grad = None
        self.pending += 1
        self.examples += batch_size
        if self.pending < self.batches:
            return False
        for param, total in self.sums.items():
            noise = torch.randn(total.shape, generator=self.generator, dtype=total.dtype) * (self.sigma * self.clip)
            param.grad = ((total + noise.to(total.device)) / self.examples).to(param.dtype)
        self.reset()
        self.steps += 1
        return True

    def state(self) -> dict[str, torch.Tensor]:
        return {"rng": self.generator.get_state(), "steps": torch.tensor(self.steps)}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(tensors["rng"])
        self.steps = int(tensors["steps"])
        self.reset()


def per_example_gradients(modules: Iterable[torch.nn.Module | None], adapter: str) -> dict:
    """{parameter: (B, *shape)}: the per-example gradient of each factor of `adapter` in the LoRA
    layers of `modules`, from the records the layers kept (cleared here)."""
    grads: dict = {}
    for module in modules:
        for layer in lora_layers(module):
            for slot, x, u, g in layer.take_per_example(adapter):
                a, b = layer.lora_A[slot][adapter], layer.lora_B[slot][adapter]
                x, u, g = (t.reshape(t.shape[0], -1, t.shape[-1]).float() for t in (x, u, g))
                grad_b = torch.einsum("bto,btr->bor", g, u)  # d/dB of sum_t g_t . (B u_t)
                grad_a = torch.einsum("btr,bti->bri", g @ b.detach().float(), x)  # d/dA through u = A x
                for param, grad in ((a, grad_a), (b, grad_b)):
                    grads[param] = grads[param] + grad if param in grads else grad
    return grads


def host_clip(clip: float, hosts: int) -> float:
    """Each host's share of C when `hosts` hosts train one client's adapters: C / sqrt(hosts)."""
    return clip / math.sqrt(max(hosts, 1))


# -- accounting -----------------------------------------------------------------------------------
def epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """(epsilon, delta)-DP of `steps` subsampled Gaussian steps (Opacus's RDP accountant)."""
    if sigma <= 0 or steps <= 0:
        return math.inf if sigma <= 0 and steps > 0 else 0.0
    import warnings

    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, min(sample_rate, 1.0), steps)]
    with warnings.catch_warnings():  # an optimum at the end of Opacus's orders only loosens the bound
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def calibrate(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The sigma whose `steps` steps at `sample_rate` reach `target_epsilon` at `delta`."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)  # only a looser bound, said once
    try:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                     sample_rate=min(sample_rate, 1.0), steps=steps, accountant="rdp")  # fmt: skip
        return float(sigma)
    except ValueError as error:
        raise UsageError(f"no noise reaches epsilon {target_epsilon:g} at delta {delta:g} over {steps} steps at "
                         f"sampling rate {sample_rate:.3g} ({error}); ask for a larger epsilon.") from None  # fmt: skip
