"""Your own data: JSONL, JSON, CSV or Parquet files, or a folder written by
`datasets.Dataset.save_to_disk`, read with the `datasets` library (never from the hub).

Record shapes (one per file, found from its fields):
  prompt/response   `prompt` and `response` (other names with --prompt-field/--response-field);
                    the text is prompt + response, the loss on the response and end-of-text;
  Alpaca            `instruction`, optional `input`, `output`: prompt = instruction, a blank line
                    and the input if any, then a blank line; response = output;
  chat              `messages`, a list of {role, content}, rendered with the tokenizer's chat
                    template (PLAIN_CHAT_TEMPLATE where it has none); the loss on every
                    assistant turn, its end-of-turn tokens included.
Records longer than max_seq_len are truncated: the prompt first, keeping its end (down to half of
max_seq_len), then the response, keeping its start."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hsplitlora.data.e2e import IGNORE_INDEX, Encoded
from hsplitlora.errors import UsageError, check_regular_file, read_text

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# A plain template for tokenizers without one (the tiny test models): "role: content" lines, each
# assistant turn closed by end-of-text.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@dataclass(frozen=True)
class Record:
    """One training example: text pieces (text, trained) in order, `trained` pieces carrying the
    loss (prompt/response records are [(prompt, False), (response + eos, True)]), or a chat's
    messages, rendered with the tokenizer's template when encoded."""

    pieces: tuple[tuple[str, bool], ...]
    source: str  # "data file FILE line N": where the record came from, for messages
    group: str | None = None  # the value of the partition field, for Dirichlet partitions
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) of a chat record
    reference: str = ""  # the response (a chat's last assistant turn), for generation metrics


@dataclass
class Fields:
    prompt: str = "prompt"
    response: str = "response"
    partition: str | None = None


def data_files(path: str | Path) -> list[Path]:
    """The files of --client-data DIR: one data file or save_to_disk folder per client, in sorted
    name order."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"client data {folder} is not a folder; give a folder with one data file per client.")
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.suffix in SUFFIXES or _saved(p)))
    if not found:
        raise UsageError(
            f"client data folder {folder} holds no data files; put one .jsonl, .json, .csv or .parquet file "
            "(or save_to_disk folder) per client in it."
        )
    return found


def _saved(path: Path) -> bool:
    """A save_to_disk folder: of one dataset (dataset_info.json, state.json) or of a DatasetDict."""
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and any((path / name).is_file() for name in markers)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of one file or save_to_disk folder, as dicts."""
    path = Path(path)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only; never the hub
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    if path.is_dir():
        if not _saved(path):
            raise UsageError(f"data folder {path} is not a folder written by datasets' save_to_disk.")
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises many kinds on damaged folders
            raise UsageError(f"data folder {path} cannot be read by datasets.load_from_disk ({error}).") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise UsageError(
                    f"data folder {path} holds the splits {list(loaded)}, not one dataset or a 'train' split."
                )
            loaded = loaded["train"]
        return list(loaded)
    check_regular_file(path, "data file")
    if path.suffix not in SUFFIXES:
        raise UsageError(
            f"data file {path} has the suffix {path.suffix!r}; use .jsonl, .json, .csv or .parquet, or a "
            "save_to_disk folder."
        )
    if not path.read_bytes().strip():
        raise UsageError(f"data file {path} holds no records.")
    if path.suffix == ".csv":
        return _csv_rows(path)
    if path.suffix in (".jsonl", ".json"):
        _check_json(path)
    try:
        loaded = datasets.load_dataset(SUFFIXES[path.suffix], data_files=str(path), split="train",
                                       cache_dir=str(_cache_dir()))  # fmt: skip
    except Exception as error:
        cause = error.__cause__ or error
        reason = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise UsageError(f"data file {path} cannot be read as {path.suffix[1:]} ({reason}).") from None
    return list(loaded)


def _csv_rows(path: Path) -> list[dict]:
    """A CSV file's rows with every field as text, as written: a response "42" stays "42" (a type
    guess would make it a number); a byte-order mark and CRLF line ends are fine."""
    import csv
    import io

    text = read_text(path, "data file").removeprefix("\ufeff")
    csv.field_size_limit(2**31 - 1)  # a long response is one field, not an error
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise UsageError(f"data file {path} cannot be read as csv ({error}).") from None
    if not rows:
        raise UsageError(f"data file {path} holds a header line but no records.")
    return rows


def _cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hsplitlora")) / "datasets"


def _check_json(path: Path) -> None:
    """JSON errors with the line they are on (datasets reports neither)."""
    text = read_text(path, "data file")
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"data file {path} line {number} is not valid JSON ({error.msg}).") from None
                if not isinstance(value, dict):
                    raise UsageError(f"data file {path} line {number} is not a JSON object (one record per line).")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"data file {path} line {error.lineno} is not valid JSON ({error.msg}).") from None
    if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        raise UsageError(f"data file {path} must hold a JSON list of records (objects), or be JSON Lines (.jsonl).")


def to_records(rows: Sequence[dict], path: Path, fields: Fields, eos: str) -> list[Record]:
    """Rows of one file as records, after checking every field (one sentence per problem)."""
    if not rows:
        raise UsageError(f"data file {path} holds no records.")
    columns = set(rows[0])
    line = "line" if path.suffix == ".jsonl" else "record"

    def where(index: int) -> str:
        return f"data file {path} {line} {index + 1}" if line == "line" else f"data file {path} record {index + 1}"

    if fields.partition is not None and fields.partition not in columns:
        raise UsageError(f"data file {path} has no field {fields.partition!r} to partition by; its fields are "
                         f"{sorted(columns)}.")  # fmt: skip
    records = []
    for index, row in enumerate(rows):
        group = None if fields.partition is None else str(row.get(fields.partition))
        if "messages" in columns:
            messages = _chat_messages(row.get("messages"), where(index))
            last = [content for role, content in messages if role == "assistant"][-1]
            records.append(Record((), where(index), group, messages, last))
            continue
        if {fields.prompt, fields.response} <= columns:
            prompt, response = _text(row, fields.prompt, where(index)), _text(row, fields.response, where(index))
            pieces, reference = ((prompt, False), (response + eos, True)), response
        elif {"instruction", "output"} <= columns:
            instruction, output = _text(row, "instruction", where(index)), _text(row, "output", where(index))
            extra = row.get("input") or ""
            prompt = instruction + (f"\n\n{extra}" if str(extra).strip() else "") + "\n\n"
            pieces, reference = ((prompt, False), (output + eos, True)), output
        else:
            raise UsageError(
                f"data file {path} has an unknown record shape (fields {sorted(columns)}); give "
                f"{fields.prompt!r}/{fields.response!r} (or name them with --prompt-field/--response-field), "
                "'instruction'/'input'/'output', or 'messages'."
            )
        records.append(Record(pieces, where(index), group, reference=reference))
    return records


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise UsageError(f"{where} has no {name!r}.")
    if not isinstance(value, str):
        raise UsageError(f"{where}: {name!r} must be text, got {type(value).__name__}.")
    if name not in ("prompt", "instruction") and not value.strip():
        raise UsageError(f"{where} has an empty {name!r}; every record needs a response to learn.")
    return value


def _chat_messages(messages, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str):  # fmt: skip
            raise UsageError(f"{where}: every message needs a text 'role' and 'content'.")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise UsageError(f"{where} has no assistant message with content to learn.")
    return tuple((m["role"], m["content"]) for m in messages)


def render_chat(messages: list[dict], tokenizer, where: str) -> tuple[tuple[str, bool], ...]:
    """The conversation as text pieces, assistant turns trained: each assistant turn is what
    rendering the conversation up to it adds after the generation prompt."""

    def render(part, generation):
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation)

    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, full = render(messages[:k], True) if k else render([], True), render(messages[: k + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise UsageError(f"{where}: the tokenizer's chat template does not render the conversation turn by turn, "
                             "so the assistant tokens cannot be found.")  # fmt: skip
        pieces += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    rest = render(messages, False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return tuple(p for p in pieces if p[0])


def prompt_of(record: Record, tokenizer) -> str:
    """What generation continues: the prompt, or a chat up to its last assistant turn with the
    template's generation prompt."""
    if record.messages is None:
        return record.pieces[0][0]
    messages = [{"role": role, "content": content} for role, content in record.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)


def encode_record(record: Record, tokenizer, max_len: int) -> tuple[Encoded, bool]:
    """Tokens and labels (IGNORE_INDEX off the trained pieces); pieces are tokenized apart so the
    mask falls exactly on them. Returns (encoded, truncated)."""
    pieces = record.pieces
    if record.messages is not None:
        messages = [{"role": role, "content": content} for role, content in record.messages]
        pieces = render_chat(messages, tokenizer, record.source)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids += tokens
        labels += tokens if trained else [IGNORE_INDEX] * len(tokens)
    if len(ids) <= max_len:
        return Encoded(ids, labels), False
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # the prompt is ids[:first]
    keep_prompt = min(first, max(max_len - (len(ids) - first), max_len // 2))
    start = first - keep_prompt
    return Encoded(ids[start : start + max_len], labels[start : start + max_len]), True
