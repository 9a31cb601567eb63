"""The memory model of method.md section 5 (bytes, dtype-aware):

    Mem_client(s, r) = P_emb + s * P_block + s * A_block(b, T) + sum_W C(W, r_W)
    Mem_server(s, r) = (L - s) * A_block(b, T) + A_head(b, T) + sum_W C(W, r_W)     (per client)
    C(W, r) = bytes * [ r (d_in + d_out) * (1 param + 1 grad + 2 AdamW states) + b T (d_in + r) ]
              + bytes * [ r (d_in + d_out) + b T r ]       (persistent adapters: the anchor B0, A0 and A0 x)

In a U-shaped split (`tail_blocks` t set) the client also holds the last t blocks, the final norm
and the head (only the norm's weights when the head is tied to the embeddings it already holds)
and their activations; the main server's share loses them:

    Mem_client(s, r) += t * (P_block + A_block(b, T)) + P_head_extra + A_head(b, T)
    Mem_server(s, r)  = (L - t - s) * A_block(b, T) + sum_W C(W, r_W)

The last term of C is what an adapter keeps for backward: its input x (b T d_in) and A x (b T r).
A_block and A_head are measured once per model, dtype and batch shape: the bytes of the distinct
tensors autograd saves for backward in one block (its input requiring grad) or in the head and
loss, plus the largest temporaries of backward (for the head: two logits-sized gradients alive at
once, that of the log-probabilities and that of the logits). The main
server's frozen weights (blocks from the shallowest split on, and the head) are shared by all
clients and reported apart from the per-client memory.

Recomputed client blocks (`recompute`, beyond method.md: activation checkpointing of the client's
front blocks): a block keeps only its input (b T d in the weights' dtype) and recomputes the rest
in backward, one block at a time, so the front's activations become

    s * h_block + 2 A_block + max over the front's blocks of that block's adapters' saved inputs

and each front adapter keeps its weights and optimizer state alone (2 A_block: the recomputed
block's saved tensors and, while it runs backward, their gradients; with one A_block the model
under-predicted measured peaks by 1.7-6.4%); the time model adds the recomputed forward. `auto`
recomputes exactly where a client's cut (or its fixed ranks) would not fit without it.

Quantized frozen blocks (`client_quant`, `server_quant`: int8 or nf4) replace P_block by its
quantized bytes (every linear weight: int8 d_out d_in + 4 d_out, nf4 d_out d_in / 2 + 4 d_out d_in
/ 64; norms and biases as they are) plus the one weight dequantized at a time while it computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import Candidate
from hsplitlora.lora.layer import MultiLoRALayer
from hsplitlora.lora.quant import quantized_bytes
from hsplitlora.losses import target_token_loss
from hsplitlora.models.architectures import architecture_of, hidden_size

ADAMW_STATES = 2
ADAPTER_BYTES = 4  # adapters, their gradients, AdamW states and saved inputs are float32


@dataclass(frozen=True)
class CandidateShape:
    block: int
    d_in: int
    d_out: int


@dataclass
class MemoryModel:
    num_blocks: int
    dtype_bytes: int
    embedding_bytes: int  # P_emb
    block_bytes: int  # P_block
    head_bytes: int  # final norm + LM head (a server holds its own copy even when tied)
    block_activation_bytes: int  # A_block(b, T)
    head_activation_bytes: int  # A_head(b, T)
    batch_size: int
    seq_len: int
    candidates: dict[str, CandidateShape] = field(default_factory=dict)
    norm_bytes: int = 0  # the final norm alone
    head_tied: bool = False  # the LM head shares the embeddings' weight
    tail_blocks: int | None = None  # U-shaped split: the client also runs the last t blocks and the head
    anchored: bool = False  # adapters keep an anchor (B0, A0) across rounds (method.md section 6)
    # Quantized frozen blocks: P_block held as int8 / nf4 (its linear weights quantized, norms and
    # biases as they are), and the largest linear weight dequantized at once while it computes.
    quant_block_bytes: dict[str, int] = field(default_factory=dict)
    dequantized_bytes: int = 0
    client_quant: str = "none"
    server_quant: str = "none"
    # DP-SGD (privacy/dp.py): each adapter also keeps the gradient at its layer's output for the step
    # and, while the step's gradients are privatised, every example's gradient of A and B.
    per_example: bool = False
    per_example_sums: bool = False  # a DP-SGD step over several batches keeps the clipped sum (one more copy)
    # Activation recomputation on the clients' front blocks: off, on, or auto (where the cut needs it).
    recompute: str = "off"
    boundary_bytes: int = 0  # a block's input, b T d in the weights' dtype: what a recomputed block keeps

    @property
    def u_shaped(self) -> bool:
        return self.tail_blocks is not None

    @property
    def middle_end(self) -> int:
        """One past the main server's last block: L, or L - t in a U-shaped split."""
        return self.num_blocks - (self.tail_blocks or 0)

    @property
    def deepest_split_point(self) -> int:
        """The deepest cut that leaves the main server one block."""
        return self.middle_end - 1

    def with_tail(self, tail_blocks: int | None) -> MemoryModel:
        """This model for a U-shaped split keeping the last `tail_blocks` on the client (None: the
        ordinary split)."""
        return replace(self, tail_blocks=tail_blocks)

    def with_quant(self, client_quant: str, server_quant: str) -> MemoryModel:
        """This model for clients holding their blocks as `client_quant` and the main server its
        blocks as `server_quant` (none, int8, nf4)."""
        return replace(self, client_quant=client_quant, server_quant=server_quant)

    def block_bytes_as(self, kind: str) -> int:
        """P_block held as `kind`, plus the one weight dequantized while it computes."""
        return self.block_bytes if kind == "none" else self.quant_block_bytes[kind]

    def _frozen_blocks(self, blocks: int, kind: str) -> int:
        return blocks * self.block_bytes_as(kind) + (self.dequantized_bytes if kind != "none" and blocks else 0)

    def with_per_example(self, per_example: bool, sums: bool = False) -> MemoryModel:
        """This model for DP-SGD's per-example gradients (or without them); `sums`: its steps span
        several batches, whose clipped sum each adapter keeps."""
        return replace(self, per_example=per_example, per_example_sums=per_example and sums)

    def with_recompute(self, mode: str) -> MemoryModel:
        """This model for clients that recompute their front blocks' activations: off, on or auto."""
        return replace(self, recompute=mode)

    def recomputes(self, split_point: int, budget: int, rho: float, ranks: Mapping[str, int] | None = None) -> bool:
        """Whether a client with this budget recomputes at this cut: always under `on`; under `auto`
        exactly when it would not fit without: its adapter-free memory over (1 - rho) of the budget,
        or with `ranks` (a plan that fixes them) its memory with them over the budget."""
        if self.recompute == "on":
            return True
        if self.recompute != "auto":
            return False
        if self.client_bytes(split_point, recompute=False) > (1 - rho) * budget:
            return True
        return ranks is not None and self.client_bytes(split_point, ranks, recompute=False) > budget

    def with_anchors(self, anchored: bool) -> MemoryModel:
        """This model for adapters that keep an anchor (B0, A0) beside their factors."""
        return replace(self, anchored=anchored)

    def client_blocks(self, split_point: int) -> int:
        return split_point + (self.tail_blocks or 0)

    def server_blocks(self, split_point: int) -> int:
        return self.middle_end - split_point

    def adapter_bytes(self, name: str, rank: int) -> int:
        """C(W, r): parameters, gradients, AdamW states and saved activations of one adapter."""
        return self.adapter_state_bytes(name, rank) + self.adapter_saved_bytes(name, rank)

    def adapter_state_bytes(self, name: str, rank: int) -> int:
        """C(W, r) without what backward needs of a step's activations: the factors, their
        gradients, AdamW states (and anchors, a DP-SGD step's sum): what a recomputed adapter keeps."""
        if rank == 0:
            return 0
        shape = self.candidates[name]
        copies = 2 + ADAMW_STATES + (1 if self.anchored else 0) + (1 if self.per_example_sums else 0)
        return ADAPTER_BYTES * rank * (shape.d_in + shape.d_out) * copies  # float32 whatever the weights' dtype

    def adapter_saved_bytes(self, name: str, rank: int) -> int:
        """What one adapter keeps of a step for backward: its input x and A x (and A0 x when anchored;
        under DP-SGD the gradient at its output and each example's gradients of A and B)."""
        if rank == 0:
            return 0
        shape = self.candidates[name]
        activations = self.batch_size * self.seq_len * (shape.d_in + rank * (2 if self.anchored else 1))
        if self.per_example:  # dL/d(B A x) kept per step, and each example's gradient of A and B
            activations += self.batch_size * (self.seq_len * shape.d_out + rank * (shape.d_in + shape.d_out))
        return ADAPTER_BYTES * activations

    def recompute_reserve(self, split_point: int, rank: int) -> int:
        """The most a recomputed front block's adapters hold at once, at `rank` on each of its
        candidates (what a client's rank greedy keeps aside before filling its budget)."""
        return self._largest_block_saved(split_point, lambda name: rank)

    def _largest_block_saved(self, split_point: int, rank_of) -> int:
        per_block: dict[int, int] = {}
        for name, shape in self.candidates.items():
            if shape.block < split_point:
                per_block[shape.block] = per_block.get(shape.block, 0) + self.adapter_saved_bytes(name, rank_of(name))
        return max(per_block.values(), default=0)

    def client_side(self, split_point: int) -> list[str]:
        """Candidates the client runs: blocks [0, s), and [L - t, L) in a U-shaped split."""
        end = self.middle_end
        return [n for n, shape in self.candidates.items() if shape.block < split_point or shape.block >= end]

    def server_side(self, split_point: int) -> list[str]:
        return [n for n, shape in self.candidates.items() if split_point <= shape.block < self.middle_end]

    def client_bytes(self, split_point: int, ranks: Mapping[str, int] | None = None,
                     recompute: bool | None = None) -> int:  # fmt: skip
        """Peak memory of a client fine-tuning blocks [0, split_point) (and, U-shaped, the last t
        blocks, the head and the loss) with these ranks; `recompute`: whether its front blocks
        recompute their activations in backward (None: as the mode `on` says)."""
        ranks = ranks or {}
        recompute = self.recompute == "on" if recompute is None else recompute
        blocks = self.client_blocks(split_point)
        frozen = self.embedding_bytes + self._frozen_blocks(blocks, self.client_quant)
        if recompute:  # the front keeps each block's input; one block at a time holds the rest, twice
            activations = (split_point * self.boundary_bytes + 2 * self.block_activation_bytes
                           + (blocks - split_point) * self.block_activation_bytes
                           + self._largest_block_saved(split_point, lambda name: ranks.get(name, 0)))  # fmt: skip
        else:
            activations = blocks * self.block_activation_bytes
        if self.u_shaped:
            frozen += self.norm_bytes if self.head_tied else self.head_bytes
            activations += self.head_activation_bytes
        adapters = sum(
            self.adapter_state_bytes(n, ranks.get(n, 0)) if recompute and self.candidates[n].block < split_point
            else self.adapter_bytes(n, ranks.get(n, 0))
            for n in self.client_side(split_point)
        )  # fmt: skip
        return frozen + activations + adapters

    def server_bytes(self, split_point: int, ranks: Mapping[str, int] | None = None) -> int:
        """The main server's memory for one client (its activations and adapters)."""
        ranks = ranks or {}
        adapters = sum(self.adapter_bytes(n, ranks.get(n, 0)) for n in self.server_side(split_point))
        head = 0 if self.u_shaped else self.head_activation_bytes
        return self.server_blocks(split_point) * self.block_activation_bytes + head + adapters

    def unsplit_bytes(self, ranks: Mapping[str, int] | None = None, full_finetune: bool = False) -> int:
        """One device running the whole model and its loss (the baselines without split). Full
        fine-tuning adds a gradient and two AdamW states for every weight."""
        ranks = ranks or {}
        weights = self.embedding_bytes + self._frozen_blocks(self.num_blocks, self.client_quant)
        activations = self.num_blocks * self.block_activation_bytes + self.head_activation_bytes
        adapters = sum(self.adapter_bytes(n, ranks.get(n, 0)) for n in self.candidates)
        return weights + activations + adapters + (3 * weights if full_finetune else 0)

    def server_frozen_bytes(self, shallowest_split: int) -> int:
        """Weights the main server holds once for everyone: blocks [s_min_used, L) and the head,
        or only the middle blocks [s_min_used, L - t) in a U-shaped split."""
        head = 0 if self.u_shaped else self.head_bytes
        return self._frozen_blocks(self.server_blocks(shallowest_split), self.server_quant) + head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MemoryModel:
        data = dict(data)
        data["candidates"] = {k: CandidateShape(**v) for k, v in data.get("candidates", {}).items()}
        return cls(**data)


def _unique_bytes(tensors: list[torch.Tensor], exclude: set[int]) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in exclude or key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `run()` executes."""
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return _unique_bytes(saved, exclude)


def measure_memory_model(
    model: nn.Module, candidates: Mapping[str, Candidate], batch_size: int, seq_len: int
) -> MemoryModel:
    """Weights counted from the modules, A_block and A_head measured on one block and the head
    at the given batch shape (random inputs: activation sizes do not depend on values)."""
    arch = architecture_of(model)
    blocks = arch.blocks(model)
    param = next(p for p in blocks[0].parameters() if p.device.type != "meta")
    dtype_bytes = param.element_size()

    def weight_bytes(module: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" not in n)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    block_index = 1 if len(blocks) > 1 else 0
    block_activation, head_activation = _activations_at(model, arch, block_index, weights, batch_size, seq_len)
    embedding = sum(weight_bytes(model.get_submodule(p)) for p in arch.embedding_paths)
    head = sum(weight_bytes(model.get_submodule(p)) for p in arch.head_paths)
    norm = sum(weight_bytes(model.get_submodule(p)) for p in arch.head_paths[:-1])
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        head = max(head, norm + embedding)
    linear_shapes = [shape for m in blocks[block_index].modules() if (shape := _linear_shape(m)) is not None]
    return MemoryModel(
        num_blocks=len(blocks),
        dtype_bytes=dtype_bytes,
        embedding_bytes=embedding,
        block_bytes=weight_bytes(blocks[block_index]),
        head_bytes=head,
        block_activation_bytes=block_activation,
        head_activation_bytes=head_activation,
        batch_size=batch_size,
        seq_len=seq_len,
        candidates={n: CandidateShape(c.block, c.d_in, c.d_out) for n, c in candidates.items()},
        norm_bytes=norm,
        head_tied=tied,
        quant_block_bytes={kind: quantized_block_bytes(blocks[block_index], kind) for kind in ("int8", "nf4")},
        dequantized_bytes=4 * max((d_out * d_in for d_out, d_in in linear_shapes), default=0),  # float32
        boundary_bytes=batch_size * seq_len * hidden_size(model.config) * dtype_bytes,
    )


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a frozen linear map (nn.Linear, Conv1D, or the one a LoRA layer wraps)."""
    if isinstance(module, MultiLoRALayer):
        return None  # its base is counted
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return None


def quantized_block_bytes(block: nn.Module, kind: str) -> int:
    """P_block with every linear weight held as `kind` (norms and biases in their own dtype)."""
    linear = {id(m.weight): _linear_shape(m) for m in block.modules() if _linear_shape(m) is not None}
    total = 0
    for name, param in block.named_parameters():
        if "lora_" in name:
            continue
        shape = linear.get(id(param))
        total += param.numel() * param.element_size() if shape is None else quantized_bytes(*shape, kind, 0)
    return total


LONGEST_MEASURED = 1024  # longer sequences are predicted from three short ones, never run
LENGTH_STEP = 128  # ... of LENGTH_STEP, 2 LENGTH_STEP and 3 LENGTH_STEP tokens


def _activations_at(model: nn.Module, arch, block_index: int, weights: set[int], batch_size: int,
                    seq_len: int) -> tuple[int, int]:  # fmt: skip
    """(A_block, A_head) at a batch shape without allocating a large one: saved tensors grow
    affinely in b at a given T and at most with T^2 (attention weights) at a given b, so two small
    batches and three short lengths predict a large, long batch exactly."""
    if batch_size > 2 and (batch_size * seq_len > 16384 or seq_len > LONGEST_MEASURED):
        one = _activations_at(model, arch, block_index, weights, 1, seq_len)
        two = _activations_at(model, arch, block_index, weights, 2, seq_len)
        return tuple(a + (batch_size - 1) * (b - a) for a, b in zip(one, two, strict=True))
    if seq_len > LONGEST_MEASURED:
        points = [_activations(model, arch, block_index, weights, batch_size, n * LENGTH_STEP) for n in (1, 2, 3)]
        x = Fraction(seq_len, LENGTH_STEP)
        return tuple(_quadratic_through(points[0][i], points[1][i], points[2][i], x) for i in range(2))
    return _activations(model, arch, block_index, weights, batch_size, seq_len)


def _quadratic_through(y1: int, y2: int, y3: int, x: Fraction) -> int:
    """The parabola through (1, y1), (2, y2), (3, y3), at x (Lagrange's form, in exact fractions)."""
    return round(y1 * (x - 2) * (x - 3) / 2 - y2 * (x - 1) * (x - 3) + y3 * (x - 1) * (x - 2) / 2)


def _activations(model: nn.Module, arch, block_index: int, weights: set[int], batch_size: int,
                 seq_len: int) -> tuple[int, int]:  # fmt: skip
    """(A_block, A_head) measured at one batch shape."""
    blocks = arch.blocks(model)
    param = next(p for p in blocks[0].parameters() if p.device.type != "meta")
    width = hidden_size(model.config)
    device = param.device  # measured where the model computes: a GPU's attention saves other tensors
    generator = torch.Generator(device).manual_seed(0)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    from hsplitlora.lora.attach import lora_layers
    from hsplitlora.models.split import ServerPart

    part = ServerPart(arch, model, block_index)
    active = {id(layer): layer.active_adapter for layer in lora_layers(part)}
    for layer in lora_layers(part):
        layer.active_adapter = None  # measure the frozen block alone; adapters are C(W, r)
    try:
        hidden = torch.randn(batch_size, seq_len, width, generator=generator, dtype=param.dtype, device=device)
        hidden.requires_grad_(True)
        context = part.context(hidden, mask, torch.arange(seq_len, device=device).unsqueeze(0))
        block_activation = _saved_bytes(lambda: part.context.call_block(part.blocks[0], hidden, context), weights)

        labels = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator, device=device)

        def head_and_loss() -> None:
            target_token_loss(part.head(hidden), labels)

        # The loss's backward holds two logits-sized float32 gradients at once beside the saved
        # log-probabilities: the incoming one of the log-probabilities and the outgoing one of the
        # logits (benchmarks/memory_model.py --tail measures this peak on a U-shaped client).
        logits_bytes = batch_size * seq_len * model.config.vocab_size * 4
        head_activation = _saved_bytes(head_and_loss, weights) + 2 * logits_bytes
    finally:
        for layer in lora_layers(part):
            layer.active_adapter = active[id(layer)]
    return block_activation, head_activation


def check_ranks(memory: MemoryModel, fixed_ranks: list[int], levels: list[int]) -> None:
    """A rank above min(d_in, d_out) adds nothing a full-rank update lacks: refuse fixed ranks and
    rank levels above the full rank of the largest candidate."""
    largest = max(min(shape.d_in, shape.d_out) for shape in memory.candidates.values())
    for name, values in (("rank", fixed_ranks), ("rank_levels", levels)):
        if values and max(values) > largest:
            raise UsageError(
                f"{name} {max(values)} exceeds {largest}, the full rank min(d_in, d_out) of the largest candidate "
                f"matrix of this model; use at most {largest}."
            )
