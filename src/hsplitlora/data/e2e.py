"""E2E NLG data: `prompt = MR + separator`, `target = " " + reference + end-of-text`; the loss
covers the target tokens only. devset.csv is the training set (split across clients) and
testset_w_refs.csv the evaluation set (the full 42k training set is not on these machines)."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hsplitlora.errors import UsageError, check_regular_file

SEPARATOR = " ||"
IGNORE_INDEX = -100
FILES = {"train": "devset.csv", "test": "testset_w_refs.csv"}


@dataclass(frozen=True)
class Example:
    mr: str
    ref: str


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on prompt and padding

    def to(self, device: torch.device | str) -> Batch:
        """This batch on `device` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_target_tokens(self) -> int:
        # Each label predicts the next token, so the first position never counts.
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def default_data_dir() -> Path:
    """$HSPLITLORA_DATA_DIR, else the shared E2E folder beside the project checkout."""
    env = os.environ.get("HSPLITLORA_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    for candidate in (repo.parent / "shared" / "data" / "e2e", Path.cwd().parent / "shared" / "data" / "e2e"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "data" / "e2e"


def data_file(data_dir: str | Path | None, split: str) -> Path:
    return Path(data_dir or default_data_dir()) / FILES[split]


def read_e2e(path: str | Path) -> list[Example]:
    """Rows of an E2E CSV with `mr` and `ref` columns."""
    path = Path(path)
    check_regular_file(path, "data file", f"; set data_dir to a folder holding {FILES['train']}")
    examples = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
                raise UsageError(f"data file {path} needs the columns 'mr' and 'ref', found {reader.fieldnames}.")
            for row in reader:
                missing = [name for name in ("mr", "ref") if row.get(name) is None]
                if missing:
                    raise UsageError(
                        f"data file {path} line {reader.line_num}: the row has no {missing[0]!r} value (a missing "
                        "field or a stray quote); every row needs an mr and a ref."
                    )
                if row["mr"].strip():
                    examples.append(Example(row["mr"].strip(), row["ref"].strip()))
        except UnicodeDecodeError as error:
            raise UsageError(
                f"data file {path} is not UTF-8 text (byte {error.object[error.start]:#x} at position {error.start}); "
                "save it as UTF-8."
            ) from None
        except csv.Error as error:
            raise UsageError(f"data file {path} line {reader.line_num} is not valid CSV ({error}).") from None
    if not examples:
        raise UsageError(f"data file {path} holds no examples.")
    return examples


def prompt_text(mr: str) -> str:
    return mr + SEPARATOR


def encode(example: Example, tokenizer, max_len: int) -> Encoded:
    """Prompt and target are tokenized apart so the loss mask falls exactly on the target."""
    return encode_many([example], tokenizer, max_len)[0]


def encode_many(examples: Sequence[Example], tokenizer, max_len: int) -> list[Encoded]:
    """encode() of every example, with all prompts and all targets each tokenized in one call (the
    same ids; E2E's 4.7k examples one call at a time took seconds of every run's start)."""
    if not examples:
        return []
    prompts = tokenizer([prompt_text(e.mr) for e in examples], add_special_tokens=False).input_ids
    targets = tokenizer([" " + e.ref for e in examples], add_special_tokens=False).input_ids
    encoded = []
    for prompt, target in zip(prompts, targets, strict=True):
        target = target + [tokenizer.eos_token_id]
        encoded.append(Encoded((prompt + target)[:max_len], ([IGNORE_INDEX] * len(prompt) + target)[:max_len]))
    return encoded


_ENCODED: dict[tuple, tuple[list[Example], list[Encoded]]] = {}  # a study's runs read the same files


def encoded_file(path: Path, tokenizer, max_len: int, limit: int | None = None) -> tuple[list[Example], list[Encoded]]:
    """The first `limit` examples of an E2E file (all, if None) and their encodings. A fast
    tokenizer's are kept for the process (keyed by the file's bytes, the tokenizer's whole
    definition and max_len), so the runs of one study or test session tokenize a file once."""
    try:
        definition = tokenizer.backend_tokenizer.to_str()
        content = Path(path).read_bytes()
    except Exception:  # a slow tokenizer or one with Python parts (nothing to key on), or read_e2e's sentence
        examples = read_e2e(path)[:limit]
        return examples, encode_many(examples, tokenizer, max_len)
    key = (hashlib.sha256(content).hexdigest(), hashlib.sha256(definition.encode()).hexdigest(),
           tokenizer.eos_token_id, getattr(tokenizer, "split_special_tokens", False), max_len, limit)  # fmt: skip
    found = _ENCODED.get(key)
    if found is None:
        examples = read_e2e(path)[:limit]
        found = (examples, encode_many(examples, tokenizer, max_len))
        if len(_ENCODED) >= 8:
            _ENCODED.pop(next(iter(_ENCODED)), None)
        _ENCODED[key] = found
    return list(found[0]), list(found[1])


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad to the longest item of the batch."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return Batch(input_ids, mask, labels)


def partition_iid(num_examples: int, clients: int, seed: int) -> list[list[int]]:
    """Shuffle the example indices with `seed` and deal them into `clients` near-equal shards."""
    if clients > num_examples:
        raise UsageError(f"{clients} clients cannot share {num_examples} examples; use at most {num_examples}.")
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::clients]) for i in range(clients)]


class Batcher:
    """Endless padding-aware batches over one client's examples: each epoch is shuffled, then
    cut into pools of `pool` batches whose items are sorted by length (similar lengths share a
    batch, so little padding), and the batches of a pool are served in shuffled order. With
    `group` g > 1 an epoch serves a multiple of g batches (the last few of its shuffled order wait
    for the next epoch), so g consecutive batches from the start never hold an example twice
    (DP-SGD's logical batch)."""

    def __init__(self, items: Sequence[Encoded], batch_size: int, pad_id: int, seed: int | str, pool: int = 16,
                 group: int = 1):  # fmt: skip
        if not items:
            raise UsageError("a client has no training examples; use fewer clients or more data.")
        self.items = list(items)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.rng = random.Random(seed)
        self.pool = pool
        self.group = group
        self._queue: list[list[int]] = []

    def _refill(self) -> None:
        order = list(range(len(self.items)))
        self.rng.shuffle(order)
        size = self.batch_size * self.pool
        epoch = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: len(self.items[i].input_ids))
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            self.rng.shuffle(batches)
            epoch.extend(batches)
        self._queue.extend(epoch[: len(epoch) - len(epoch) % self.group])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._queue:
            self._refill()
        return collate([self.items[i] for i in self._queue.pop(0)], self.pad_id)

    def state(self) -> dict:
        """Plain JSON data that resumes the same batch order."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "queue": [list(b) for b in self._queue]}

    def load_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._queue = [list(b) for b in state["queue"]]


def client_batchers(
    items: Sequence[Encoded], batch_size: int, pad_id: int, seed: int, client_id: int, group: int = 1
) -> tuple[Batcher, Batcher]:
    """A client's two batch streams over its own shard: training (seeded `seed + client_id`, epochs
    of a multiple of `group` batches) and the importance warm-up's own (a separate seed), so the
    warm-up takes no training batch and every strategy with one seed trains on the same batches in
    the same order."""
    training = Batcher(items, batch_size, pad_id, seed + client_id, group=group)
    return training, Batcher(items, batch_size, pad_id, f"warm-up/{seed}/{client_id}")


def mr_attributes(mr: str) -> dict[str, str]:
    """`name[The Eagle], food[Italian]` -> {"name": "The Eagle", "food": "Italian"}."""
    return dict(re.findall(r"(\w+)\[([^\]]*)\]", mr))


def partition_dirichlet(examples: Sequence[Example], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Non-IID E2E shards: examples grouped by their (eatType, food) attributes, see
    `partition_groups`."""
    keys = []
    for example in examples:
        attributes = mr_attributes(example.mr)
        keys.append((attributes.get("eatType", ""), attributes.get("food", "")))
    return partition_groups(keys, clients, alpha, seed)


def partition_groups(keys: Sequence, clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Non-IID shards: the examples of each group (equal key) are dealt to the clients in
    proportions drawn from Dirichlet(alpha) (small alpha: skewed); every client keeps at least one."""
    import numpy as np

    if clients > len(keys):
        raise UsageError(f"{clients} clients cannot share {len(keys)} examples; use at most {len(keys)}.")
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    shards: list[list[int]] = [[] for _ in range(clients)]
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        shares = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for client, part in enumerate(np.split(np.array(members), cuts)):
            shards[client].extend(int(i) for i in part)
    for shard in shards:  # every client keeps at least one example
        if not shard:
            donor = max(range(clients), key=lambda c: len(shards[c]))
            shard.append(shards[donor].pop())
    return [sorted(shard) for shard in shards]
