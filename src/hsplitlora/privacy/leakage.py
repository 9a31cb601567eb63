"""`hsplitlora leakage RUN_DIR`: the main server's attack on what a run's clients send across the cut.

Leakage of a cut s (method.md section 10) is the share of a client's tokens that the main
server's best attack recovers from what it receives. The attacker trains a per-token decoder
(hidden state after block s -> token id; an MLP over standardised coordinates) on public text run
through the public base model (no adapters), and also tries nearest-embedding inversion (the
cosine-nearest row of the input embedding matrix). Both attack the messages the run's clients
really send: each client's first training batches (those its round 1 trained on), through the
client's own forward and `pack` with the run's final weights (every adapter merged) and its
compression. In the standard split the labels travel with the activations: they are the
response's tokens, recovered exactly. In the U-shaped split only the activations cross."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hsplitlora.compression import pack
from hsplitlora.config import INPROCESS
from hsplitlora.data.e2e import IGNORE_INDEX, Batch, Encoded, collate, data_file, encode_many, read_e2e
from hsplitlora.errors import UsageError, read_text
from hsplitlora.lora.attach import attach_lora
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import load_model
from hsplitlora.models.split import ClientPart, check_split_point, positions
from hsplitlora.privacy.dp import clip_per_example
from hsplitlora.roles.messages import Activations, RoundPlan

LEAKAGE_FILE = "leakage.json"
ATTACKS = ("learned", "nearest")


@dataclass
class Sent:
    """One batch a client sent at one cut: the message the main server received and, to score
    the attack only, the batch the client held."""

    cut: int
    client: int
    message: Activations
    truth: Batch


# -- the attacker's side -----------------------------------------------------------------------------
class TokenDecoder(nn.Module):
    """Hidden state after block s -> token id: each coordinate standardised with the public
    text's statistics (a few coordinates are orders of magnitude larger), then an MLP whose
    outputs are the token ids the attacker saw in its public text (`vocab`)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, vocab: torch.Tensor, width: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("vocab", vocab)
        self.net = nn.Sequential(nn.Linear(mean.numel(), width), nn.GELU(), nn.Linear(width, vocab.numel()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net((hidden - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab[self(hidden).argmax(-1)]


@dataclass
class Attacker:
    """What the main server builds before it attacks: a decoder per cut, the public input
    embeddings, and what it trained on."""

    decoders: dict[int, TokenDecoder]
    embedding: torch.Tensor  # (V, d): the public model's input token embeddings
    compression: str
    public: str  # where its text came from
    public_tokens: int
    steps: int
    most_frequent: int  # the public text's most frequent token: the chance baseline's guess
    weights: str = "public"  # the model it ran its text through: public, or the run's final weights
    noise: tuple[float, float] | None = None  # (sigma, clip) of the activation noise it trained under

    @property
    def cuts(self) -> list[int]:
        return sorted(self.decoders)


def hidden_at_cuts(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cuts: Sequence[int]) -> dict[int, torch.Tensor]:  # fmt: skip
    """The activations after block s for every s in `cuts`, in one pass: ClientPart's forward,
    kept at each cut."""
    part = ClientPart(architecture_of(model), model, max(cuts))
    position_ids = positions(attention_mask)
    hidden = part.embedding(input_ids, position_ids)
    context = part.context(hidden, attention_mask, position_ids)
    found = {}
    for index, block in enumerate(part.blocks, start=1):
        hidden = part.context.call_block(block, hidden, context)
        if index in cuts:
            found[index] = hidden
    return found


def public_items(saved: dict, tokenizer, rows: int, public_text: str | Path | None = None) -> tuple[list[Encoded], str]:
    """The attacker's auxiliary text: `rows` passages of `public_text` (one per line), or for an
    E2E run, of E2E's test set, whose records are disjoint from the clients' training data."""
    max_len = saved.get("max_seq_len", 128)
    if public_text is not None:
        lines = [line for line in read_text(Path(public_text), "public text").splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"public text {public_text} holds no text; give a file with one passage per line.")
        chosen = lines[:rows]
        ids = [tokenizer(line, add_special_tokens=False).input_ids[:max_len] for line in chosen]
        return [Encoded(i, [IGNORE_INDEX] * len(i)) for i in ids if i], f"{len(chosen)} lines of {public_text}"
    if saved.get("data", "e2e") != "e2e" or saved.get("client_data"):
        raise UsageError("this run trained on its own data; give --public-text FILE, text the main server could "
                         "have (one passage per line), for the attacker to train on.")  # fmt: skip
    path = data_file(saved.get("data_dir"), "test")
    test = read_e2e(path)
    chosen = test[:: max(1, len(test) // rows)][:rows]  # spread over the test set's meaning representations
    described = f"{len(chosen)} records of {path.name} (public, disjoint from the clients' devset.csv)"
    return encode_many(chosen, tokenizer, max_len), described


def train_decoder(features: torch.Tensor, tokens: torch.Tensor, steps: int, seed: int, width: int = 1024,
                  batch_size: int = 512, lr: float = 2e-3) -> TokenDecoder:  # fmt: skip
    """Cross-entropy over the public tokens, `steps` AdamW steps on random minibatches."""
    generator = torch.Generator().manual_seed(seed)
    vocab, targets = torch.unique(tokens, return_inverse=True)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    torch.manual_seed(seed)
    decoder = TokenDecoder(mean, std, vocab, width)
    optimizer = torch.optim.AdamW(decoder.net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for _ in range(steps):
        pick = torch.randint(len(features), (min(batch_size, len(features)),), generator=generator)
        loss = nn.functional.cross_entropy(decoder(features[pick]), targets[pick])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return decoder.eval()


@torch.no_grad()
def train_attacker(model_name: str, seed: int, dtype: str, compression: str, cuts: Sequence[int],
                   items: Sequence[Encoded], pad_id: int, public: str, steps: int = 400, batch_size: int = 16,
                   weights: dict[str, torch.Tensor] | None = None, targets: Sequence[str] = (),
                   noise: tuple[float, float] | None = None) -> Attacker:  # fmt: skip
    """Run the public text through the public base model (or, `weights` given, the model with
    those trained weights of `targets`: an attacker that also sees the aggregated updates),
    compress each activation as the run does (the attacker knows the format it receives), and
    fit one decoder per cut. With `noise` (sigma, clip), the run's DP on the activations, each
    public example is clipped and noised as the clients' are before it is compressed: the
    attacker knows the mechanism (its settings are the run's) and learns to read through it."""
    loaded = load_model(model_name, seed=seed, dtype=dtype)
    if weights is not None:
        put_weights(loaded.model, attach_lora(loaded.model, list(targets)), weights, "the run's weights")
    features: dict[int, list[torch.Tensor]] = {cut: [] for cut in cuts}
    tokens = []
    noise_generator = torch.Generator().manual_seed(seed + 7_777)
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id)
        mask = batch.attention_mask.bool()
        for cut, hidden in hidden_at_cuts(loaded.model, batch.input_ids, batch.attention_mask, cuts).items():
            if noise is not None:
                sigma, clip = noise
                hidden = clip_per_example(hidden.float(), clip)
                hidden = hidden + torch.randn(hidden.shape, generator=noise_generator) * (sigma * clip)
            features[cut].append(pack(hidden, compression).unpack()[mask])
        tokens.append(batch.input_ids[mask])
    token_ids = torch.cat(tokens)
    with torch.enable_grad():
        decoders = {cut: train_decoder(torch.cat(features[cut]), token_ids, steps, seed + cut) for cut in cuts}
    embedding = loaded.model.get_input_embeddings().weight.detach().float()
    held = "the run's final" if weights is not None else "public"
    return Attacker(decoders, embedding, compression, public, len(token_ids), steps,
                    int(torch.bincount(token_ids).argmax()), held, noise)  # fmt: skip


@torch.no_grad()
def nearest_embedding(hidden: torch.Tensor, embedding: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The token whose input embedding has the highest cosine with each activation."""
    rows = nn.functional.normalize(embedding, dim=-1)
    hidden = nn.functional.normalize(hidden.float(), dim=-1)
    return torch.cat([(hidden[i : i + chunk] @ rows.T).argmax(-1) for i in range(0, len(hidden), chunk)])


# -- what a run's clients send ------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A finished run's config.json and final weights, or one sentence saying why not."""
    from hsplitlora.reporting import read_json, read_tensors

    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / "config.json", run_dir / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise UsageError(f"{run_dir} is not a finished run folder; it needs config.json and model.safetensors "
                         "(written by hsplitlora run when its last round ends).")  # fmt: skip
    saved = read_json(config_path, "run config")
    if not isinstance(saved.get("model"), str) or not isinstance(saved.get("targets"), list):
        raise UsageError(f"run config {config_path} names no model and targets; the file is damaged.")
    from hsplitlora.strategies import STRATEGIES

    strategy = STRATEGIES.get(saved.get("strategy"))
    if strategy is None or not strategy.crosses_cut():
        raise UsageError(f"{run_dir} is a run of {saved.get('strategy')!r}, which runs the whole model on each "
                         "client; nothing crosses a cut to measure. Give the folder of a split run.")  # fmt: skip
    return saved, read_tensors(weights_path, "run weights")


@torch.no_grad()
def put_weights(model: nn.Module, candidates: dict, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy a run's final candidate weights (every adapter merged) into a model with LoRA attached."""
    for name, weight in weights.items():
        if name not in candidates:
            raise UsageError(f"{source} holds {name!r}, which this model does not have.")
        candidate = candidates[name]
        model.get_submodule(candidate.module).weight(candidate.slot).copy_(weight)


def parse_cuts(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; range checks come once the model's blocks are known."""
    try:
        cuts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"cuts {text!r} are not whole numbers; give split points such as 1,2,4.") from None
    if not cuts:
        raise UsageError(f"cuts {text!r} name no split point; give split points such as 1,2,4.")
    return cuts


@torch.no_grad()
def capture(run_dir: str | Path, cuts: Sequence[int] | None = None, batches: int = 4,
            seed: int | None = None) -> tuple[dict, list[Sent], int, object]:  # fmt: skip
    """Rebuild the run from its folder (its model, data, shards and batch orders, in process, on
    the CPU), put its final weights in place, and at each cut (default: the run's fixed cut,
    else 1) take the Activations message each client's `forward` sends for its first `batches`
    training batches. Returns (config, what was sent, the model's blocks, the tokenizer)."""
    from hsplitlora.evaluation.run_eval import run_config
    from hsplitlora.placement import Placement
    from hsplitlora.setup import build_setup

    saved, weights = read_run(run_dir)
    config = run_config(saved)
    config.engine = INPROCESS  # the same client code; where the hosts live does not change a message
    loaded = load_model(config.model, seed=config.seed, dtype=config.dtype)
    cpu = torch.device("cpu")
    setup = build_setup(config, Placement(cpu, cpu), loaded)
    for split_point in cuts or []:
        check_split_point(split_point, setup.num_blocks, config.tail)
    cuts = list(cuts) if cuts else sorted(set(config.split_points(setup.num_blocks))) if config.split_point else [1]
    put_weights(setup.model, setup.candidates, weights, f"{run_dir}/model.safetensors")
    engine, sent = setup.engine, []
    clients = [host.client for host in engine.actors]
    orders = [client.batches.state() for client in clients]
    truths = []
    for client, order in zip(clients, orders, strict=True):
        truths.append([next(client.batches) for _ in range(batches)])
        client.batches.load_state(order)
    for cut in cuts:
        # No adapters: the final weights already hold every trained update.
        engine.configure([RoundPlan(cid, 0, cut, {}, config.tail) for cid in range(len(clients))])
        for cid, (client, order) in enumerate(zip(clients, orders, strict=True)):
            client.batches.load_state(order)
            for truth in truths[cid]:
                message = engine.transport.get(engine.actors[cid].forward())
                sent.append(Sent(cut, cid, message, truth))
    return saved, sent, setup.num_blocks, loaded.tokenizer


# -- scoring -----------------------------------------------------------------------------------------
def _rouge_l(prediction: str, reference: str) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    if not reference.split():
        return 0.0
    return float(Rouge().calc_score([prediction.lower() or " "], [reference.lower()]))


def _score(predicted: list[torch.Tensor], sent: list[Sent], tokenizer) -> dict[str, float]:
    """Top-1 token recovery over the prompt, the response and all real tokens, and the mean
    ROUGE-L of each recovered sequence against the client's."""
    right = {"prompt": 0, "response": 0}
    count = {"prompt": 0, "response": 0}
    rouge = []
    for guess, item in zip(predicted, sent, strict=True):
        ids, mask, labels = item.truth.input_ids, item.truth.attention_mask.bool(), item.truth.labels
        regions = {"prompt": mask & (labels == IGNORE_INDEX), "response": labels != IGNORE_INDEX}
        for region, where in regions.items():
            right[region] += int((guess[where] == ids[where]).sum())
            count[region] += int(where.sum())
        for row in range(ids.shape[0]):
            rouge.append(_rouge_l(tokenizer.decode(guess[row][mask[row]]), tokenizer.decode(ids[row][mask[row]])))
    share = {region: right[region] / max(count[region], 1) for region in right}
    share["all"] = sum(right.values()) / max(sum(count.values()), 1)
    share["rouge_l"] = sum(rouge) / max(len(rouge), 1)
    return share


@torch.no_grad()
def attack(sent: list[Sent], attacker: Attacker, tokenizer) -> list[dict]:
    """Per cut: each attack's recovery from the activations alone, the chance baseline, and, when
    the messages carried labels (standard split), what the labels give on top of the best attack."""
    report = []
    for cut in sorted({item.cut for item in sent}):
        items = [item for item in sent if item.cut == cut]
        entry: dict = {"cut": cut}
        hidden = [item.message.hidden.unpack() for item in items]
        guesses = {
            "learned": [_fill(h, item, attacker.decoders[cut].predict) for h, item in zip(hidden, items, strict=True)],
            "nearest": [
                _fill(h, item, lambda x: nearest_embedding(x, attacker.embedding))
                for h, item in zip(hidden, items, strict=True)
            ],  # fmt: skip
            "chance": [torch.full_like(item.truth.input_ids, attacker.most_frequent) for item in items],
        }
        for name, guess in guesses.items():
            entry[name] = _score(guess, items, tokenizer)
        best = max(ATTACKS, key=lambda name: entry[name]["all"])
        entry["best"] = best
        if all(item.message.labels is not None for item in items):
            # The labels are the response's token ids: the main server reads them, no attack needed.
            with_labels = [torch.where(item.message.labels != IGNORE_INDEX, item.message.labels, guess)
                           for item, guess in zip(items, guesses[best], strict=True)]  # fmt: skip
            entry["with_labels"] = _score(with_labels, items, tokenizer)
        report.append(entry)
    return report


def _fill(hidden: torch.Tensor, item: Sent, predict) -> torch.Tensor:
    """The attack's guess at every real position of a batch (padding keeps the pad id)."""
    mask = item.message.attention_mask.bool()
    guess = item.truth.input_ids.clone()
    guess[mask] = predict(hidden[mask])
    return guess


def measure_leakage(run_dir: str | Path, cuts: Sequence[int] | None = None, batches: int = 4,
                    public_rows: int = 400, public_text: str | Path | None = None, steps: int = 400,
                    attacker: Attacker | None = None, informed: bool = False) -> dict:  # fmt: skip
    """The leakage report of a run: per cut, what each attack recovers of the clients' prompt
    and response tokens. `attacker` reuses one trained for the same model, compression and cuts;
    `informed`: the attacker trains on the run's final weights, not the public model's."""
    saved, sent, num_blocks, tokenizer = capture(run_dir, cuts, batches)
    measured = sorted({item.cut for item in sent})
    noise = activation_noise(run_dir)
    if attacker is not None and attacker.noise != noise:
        attacker = None  # trained under other noise than this run's: train one for it
    if attacker is None or any(cut not in attacker.decoders for cut in measured):
        items, public = public_items(saved, tokenizer, public_rows, public_text)
        known = read_run(run_dir)[1] if informed else None
        attacker = train_attacker(saved["model"], saved.get("seed", 0), saved.get("dtype", "float32"),
                                  saved.get("compression", "fp32"), measured, items, tokenizer.pad_token_id, public,
                                  steps, weights=known, targets=saved["targets"], noise=noise)  # fmt: skip
    if attacker.compression != saved.get("compression", "fp32"):
        raise UsageError(f"the attacker was trained on {attacker.compression} activations and this run sends "
                         f"{saved.get('compression', 'fp32')}; train one for this run.")  # fmt: skip
    report = attack(sent, attacker, tokenizer)
    first = [item for item in sent if item.cut == measured[0]]  # every cut attacks the same tokens
    split_mode = saved.get("split_mode", "standard")
    return {
        "run": str(run_dir),
        "model": saved["model"],
        "num_blocks": num_blocks,
        "split_mode": split_mode,
        "compression": attacker.compression,
        "clients": len({item.client for item in sent}),
        "batches_per_client": batches,
        "tokens_per_cut": sum(int(item.truth.attention_mask.sum()) for item in first),
        "response_tokens_per_cut": sum(int((item.truth.labels != IGNORE_INDEX).sum()) for item in first),
        "attacker": {
            "public_text": attacker.public,
            "model_weights": attacker.weights,
            "public_tokens": attacker.public_tokens,
            "decoder": "MLP (standardised hidden -> 1024 GELU -> public vocabulary), AdamW, cross-entropy",
            "steps": attacker.steps,
            "trained_under_noise": list(attacker.noise) if attacker.noise else None,
        },
        "cuts": report,
        # L(s), what a planner reads: the best attack's share of all tokens from the activations
        # alone, and in the standard split with the labels the main server also receives.
        "curve": [
            {
                "cut": e["cut"],
                "token_recovery": e[e["best"]]["all"],
                "token_recovery_with_labels": e["with_labels"]["all"] if "with_labels" in e else None,
            }
            for e in report
        ],  # fmt: skip
    }


def activation_noise(run_dir: str | Path) -> tuple[float, float] | None:
    """(sigma, clip) of the run's DP on the activations (sigma as calibrated), from its summary."""
    from hsplitlora.reporting import read_json

    path = Path(run_dir) / "summary.json"
    dp = (read_json(path, "run summary").get("privacy") or {}).get("dp") if path.is_file() else None
    if not dp or not dp.get("activation_sigma"):
        return None
    return float(dp["activation_sigma"]), float(dp["activation_clip"])


def write_report(run_dir: str | Path, report: dict) -> Path:
    """leakage.json in the run folder (replacing an earlier one hsplitlora wrote, never another file)."""
    from hsplitlora.folders import check_foreign, record
    from hsplitlora.reporting import write_json_atomic

    run_dir = Path(run_dir)
    check_foreign(run_dir, (LEAKAGE_FILE,), "a file", "move it away first.")
    record(run_dir, "run", (LEAKAGE_FILE,))
    write_json_atomic(run_dir / LEAKAGE_FILE, report)
    return run_dir / LEAKAGE_FILE


def format_report(report: dict) -> str:
    """The report as a table: one line per cut."""
    lines = [f"{report['model']}, {report['split_mode']} split, {report['compression']}; {report['tokens_per_cut']} "
             f"tokens of {report['clients']} clients per cut; attacker's text: {report['attacker']['public_text']}",
             "cut  learned: prompt response  all  ROUGE-L | nearest: all  ROUGE-L | chance | with labels"]  # fmt: skip
    for e in report["cuts"]:
        learned, nearest = e["learned"], e["nearest"]
        labels = f"{e['with_labels']['all']:.3f}" if "with_labels" in e else "(none sent)"
        lines.append(f"{e['cut']:>3}  {learned['prompt']:>14.3f} {learned['response']:>8.3f} {learned['all']:>5.3f} "
                     f"{learned['rouge_l']:>7.3f} | {nearest['all']:>12.3f} {nearest['rouge_l']:>7.3f} | "
                     f"{e['chance']['all']:>6.3f} | {labels:>16}")  # fmt: skip
    return "\n".join(lines)
