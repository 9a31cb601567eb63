"""What a run trains and validates on: E2E (the default), one file of your own split across the
clients, or one file per client (`client_data`), each encoded and shared out once at setup."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from hsplitlora.data.e2e import (
    IGNORE_INDEX,
    Encoded,
    data_file,
    encoded_file,
    partition_dirichlet,
    partition_groups,
    partition_iid,
)
from hsplitlora.data.records import (
    PLAIN_CHAT_TEMPLATE,
    Fields,
    Record,
    data_files,
    encode_record,
    read_rows,
    to_records,
)
from hsplitlora.errors import UsageError


@dataclass
class TrainingData:
    items: list[Encoded]  # every client's training examples
    shards: list[list[int]]  # per client: indices into items (its own, never pooled)
    validation: list[Encoded]
    description: str  # what was read, for summary.json
    notes: list[str] = field(default_factory=list)  # said once when the run starts
    source_files: list[str] = field(default_factory=list)
    validation_records: list[Record] | None = None  # your own data's (None for E2E), for generation


def load_training_data(config, tokenizer) -> TrainingData:
    """Read, check and encode the run's data (every problem is one sentence before training)."""
    if config.client_data is not None:
        return _per_client(config, tokenizer)
    if config.data == "e2e":
        return _e2e(config, tokenizer)
    return _one_file(config, tokenizer)


def client_files(config) -> list[Path]:
    return data_files(config.client_data)


def check_data_settings(config) -> None:
    """The data settings that contradict each other or the client files found."""
    own = config.data != "e2e"
    if config.client_data is not None:
        if own:
            raise UsageError("give data (one file split across clients) or client_data (a file per client), not both.")
        count = len(data_files(config.client_data))
        if count != config.clients:
            raise UsageError(
                f"client_data {config.client_data} holds {count} client files but clients is {config.clients}; "
                f"leave clients out (it is the number of files) or give {count}."
            )
        if config.partition != "iid" or config.partition_field is not None:
            raise UsageError("client_data gives each client its own file, so partition settings do not apply.")
    if config.partition_field is not None and not own and config.client_data is None:
        raise UsageError("partition_field names a field of your own data; E2E's Dirichlet partition uses eatType "
                         "and food.")  # fmt: skip
    if own and config.partition == "dirichlet" and config.partition_field is None:
        raise UsageError("partition dirichlet on your own data needs partition_field, the field whose values group "
                         "the records.")  # fmt: skip
    for name in ("prompt_field", "response_field"):
        if not getattr(config, name).strip():
            raise UsageError(f"{name} must name a field, got an empty name.")


def refuse_ignored_data_settings(config, given: set[str]) -> None:
    """Data settings the data given would ignore (`given`: the settings set explicitly), refused
    with the reason."""
    own = config.client_data or (config.data if config.data != "e2e" else None)
    if config.val_data is not None and own is None:
        raise UsageError("val_data validates a run on your own data, and E2E training validates on E2E's "
                         "testset_w_refs.csv; drop val_data, or give data FILE.")  # fmt: skip
    if config.data_dir is not None and own is not None:
        raise UsageError(f"data_dir is E2E's folder, and this run reads your own data ({own}); drop data_dir.")
    if config.client_data is not None and "dirichlet_alpha" in given:
        raise UsageError("client_data gives each client its own file, so dirichlet_alpha does not apply; drop it.")
    if config.partition_field is not None and config.partition != "dirichlet":
        raise UsageError(f"partition_field groups records for partition dirichlet, and partition is "
                         f"{config.partition}; add partition dirichlet or drop partition_field.")  # fmt: skip
    if "dirichlet_alpha" in given and config.partition != "dirichlet":
        raise UsageError(f"dirichlet_alpha shapes a Dirichlet partition, and partition is {config.partition}; add "
                         "partition dirichlet or drop dirichlet_alpha.")  # fmt: skip


# -- E2E ----------------------------------------------------------------------------------------------
def _e2e(config, tokenizer) -> TrainingData:
    examples, encoded = encoded_file(data_file(config.data_dir, "train"), tokenizer, config.max_seq_len)
    kept = [i for i, item in enumerate(encoded) if _trains(item)]
    notes = []
    if not kept:
        raise UsageError(
            f"max_seq_len {config.max_seq_len} cuts every training example before its response starts, so nothing "
            "can be trained; use a larger max_seq_len (the default is 128)."
        )
    if len(kept) < len(encoded):
        notes.append(
            f"{len(encoded) - len(kept)} of {len(encoded)} training examples keep no response token within "
            f"max_seq_len {config.max_seq_len}; they are left out (a larger max_seq_len keeps them)."
        )
    examples, encoded = [examples[i] for i in kept], [encoded[i] for i in kept]
    if config.partition == "dirichlet":
        shards = partition_dirichlet(examples, config.clients, config.dirichlet_alpha, config.seed)
    else:
        shards = partition_iid(len(encoded), config.clients, config.seed)
    validation = encoded_file(data_file(config.data_dir, "test"), tokenizer, config.max_seq_len, config.val_size)[1]
    _check_validation_tokens(validation, config, "E2E's validation examples")
    description = "E2E devset.csv for training (split across clients), testset_w_refs.csv for validation"
    return TrainingData(encoded, shards, validation, description, notes)


def _trains(item: Encoded) -> bool:
    """Whether an example has a target token to learn: the first token is never predicted."""
    return any(label != IGNORE_INDEX for label in item.labels[1:])


def _keep_trainable(records: list[Record], encoded: list[Encoded], where: str, config,
                    notes: list[str]) -> tuple[list[Record], list[Encoded]]:  # fmt: skip
    """The records that keep a response token to learn within max_seq_len (refused if none)."""
    kept = [i for i, item in enumerate(encoded) if _trains(item)]
    if not kept:
        raise UsageError(f"max_seq_len {config.max_seq_len} leaves no response token to learn in any record of "
                         f"{where}; use a larger max_seq_len (the default is 128).")  # fmt: skip
    if len(kept) < len(encoded):
        notes.append(f"{len(encoded) - len(kept)} of {len(encoded)} records of {where} keep no response token "
                     f"within max_seq_len {config.max_seq_len}; they are left out (a larger max_seq_len keeps "
                     "them).")  # fmt: skip
    return [records[i] for i in kept], [encoded[i] for i in kept]


def _check_validation_tokens(validation: list[Encoded], config, where: str) -> None:
    if not any(_trains(item) for item in validation):
        raise UsageError(f"max_seq_len {config.max_seq_len} leaves no response token of {where} to measure "
                         "perplexity on; use a larger max_seq_len (the default is 128).")  # fmt: skip


# -- your own data --------------------------------------------------------------------------------------
def _fields(config) -> Fields:
    return Fields(config.prompt_field, config.response_field, config.partition_field)


def _records(path: Path, config, tokenizer) -> list[Record]:
    return to_records(read_rows(path), path, _fields(config), tokenizer.eos_token)


def _encode_all(records: list[Record], tokenizer, config, counts: dict) -> list[Encoded]:
    _chat_template(tokenizer, records)
    encoded = []
    for record in records:
        item, truncated = encode_record(record, tokenizer, config.max_seq_len)
        counts["truncated"] += truncated
        counts["total"] += 1
        encoded.append(item)
    return encoded


def _chat_template(tokenizer, records: list[Record]) -> None:
    if any(r.messages is not None for r in records) and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def _held_out(count: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(validation, training) indices: a seeded slice of at most a tenth (at least one record)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    size = max(1, min(val_size, count // 10))
    return sorted(order[:size]), sorted(order[size:])


def _validation_file(config, tokenizer, counts: dict) -> tuple[list[Encoded], list[Record]]:
    records = _records(Path(config.val_data), config, tokenizer)[: config.val_size]
    validation = _encode_all(records, tokenizer, config, counts)
    _check_validation_tokens(validation, config, f"validation file {config.val_data}")
    return validation, records


def _truncation_note(counts: dict, max_seq_len: int) -> list[str]:
    if not counts["truncated"]:
        return []
    return [f"{counts['truncated']} of {counts['total']} records are longer than max_seq_len {max_seq_len} and were "
            "truncated (the prompt first, keeping its end; then the response, keeping its start)."]  # fmt: skip


def _one_file(config, tokenizer) -> TrainingData:
    path = Path(config.data)
    records = _records(path, config, tokenizer)
    counts = {"truncated": 0, "total": 0}
    encoded = _encode_all(records, tokenizer, config, counts)
    notes: list[str] = []
    records, encoded = _keep_trainable(records, encoded, str(path), config, notes)
    if config.val_data is not None:
        validation, validation_records = _validation_file(config, tokenizer, counts)
        train = list(range(len(encoded)))
        said = f"validation on {config.val_data}"
    else:
        held, train = _held_out(len(encoded), config.val_size, config.seed)
        validation, validation_records = [encoded[i] for i in held], [records[i] for i in held]
        said = f"validation on {len(held)} records held out of {path} (seed {config.seed}), not trained on"
        notes.append(f"{said}; give --val-data FILE to validate on a file of your own.")
        if len(train) < config.clients:
            raise UsageError(
                f"data file {path} holds {len(encoded)} usable record(s) and {len(held)} of them are held out for "
                f"validation (no --val-data given), which leaves {len(train)} to train {config.clients} client(s); "
                "give more records, fewer clients, or --val-data FILE."
            )
    items = [encoded[i] for i in train]
    if config.partition == "dirichlet":
        shards = partition_groups([records[i].group for i in train], config.clients, config.dirichlet_alpha,
                                  config.seed)  # fmt: skip
    else:
        shards = partition_iid(len(items), config.clients, config.seed)
    notes += _truncation_note(counts, config.max_seq_len)
    description = f"{path} ({len(items)} records split across clients); {said}"
    return TrainingData(items, shards, validation, description, notes, [str(path)], validation_records)


def _per_client(config, tokenizer) -> TrainingData:
    files = client_files(config)
    counts = {"truncated": 0, "total": 0}
    items: list[Encoded] = []
    shards: list[list[int]] = []
    validation: list[Encoded] = []
    validation_records: list[Record] = []
    per_client_val = max(1, config.val_size // len(files))
    notes: list[str] = []
    for index, path in enumerate(files):
        records = _records(path, config, tokenizer)
        encoded = _encode_all(records, tokenizer, config, counts)
        records, encoded = _keep_trainable(records, encoded, f"client file {path}", config, notes)
        if config.val_data is None:
            if len(encoded) < 2:
                raise UsageError(
                    f"client file {path} holds {len(encoded)} usable record(s); with no --val-data each client keeps "
                    "some records back for validation, so give at least 2 (or --val-data FILE)."
                )
            held, train = _held_out(len(encoded), per_client_val, config.seed + index)
            validation += [encoded[i] for i in held]
            validation_records += [records[i] for i in held]
            encoded = [encoded[i] for i in train]
        shards.append(list(range(len(items), len(items) + len(encoded))))
        items += encoded
    if config.val_data is not None:
        validation, validation_records = _validation_file(config, tokenizer, counts)
        said = f"validation on {config.val_data}"
    else:
        said = f"validation on {len(validation)} records held out of the client files (up to {per_client_val} each)"
        notes.append(f"{said}; give --val-data FILE to validate on a file of your own.")
    notes += _truncation_note(counts, config.max_seq_len)
    description = f"one file per client in {config.client_data} ({', '.join(p.name for p in files)}); {said}"
    return TrainingData(items, shards, validation, description, notes, [str(p) for p in files], validation_records)
