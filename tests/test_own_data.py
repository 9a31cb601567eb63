"""Issue 15: your own data (JSONL, JSON, CSV, Parquet, save_to_disk; prompt/response, Alpaca and
chat records), one data set per client, and one sentence for every kind of bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsplitlora.cli import main
from hsplitlora.data.e2e import IGNORE_INDEX
from hsplitlora.data.records import PLAIN_CHAT_TEMPLATE, Fields, encode_record, read_rows, to_records
from hsplitlora.models.loading import byte_tokenizer

PAIRS = [("Translate to French: cat\n", "chat"), ("Translate to French: dog\n", "chien"),
         ("Translate to French: house\n", "maison"), ("Translate to French: tree\n", "arbre"),
         ("Translate to French: water\n", "eau")] * 4  # fmt: skip
CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
] * 10  # fmt: skip


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:
        return int(exit_.code)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs_rows(fields=("prompt", "response")) -> list[dict]:
    return [{fields[0]: p, fields[1]: r} for p, r in PAIRS]


def make(kind: str, folder: Path) -> Path:
    import datasets

    rows = pairs_rows()
    if kind == "jsonl":
        return write_jsonl(folder / "train.jsonl", rows)
    if kind == "chat":
        return write_jsonl(folder / "chat.jsonl", [{"messages": m} for m in CHATS])
    if kind == "alpaca-json":
        path = folder / "alpaca.json"
        path.write_text(json.dumps([{"instruction": "Translate to French", "input": p.split(": ")[1].strip(),
                                     "output": r} for p, r in PAIRS]))  # fmt: skip
        return path
    table = datasets.Dataset.from_list(rows)
    if kind == "csv":
        table.to_csv(folder / "train.csv", index=False)
        return folder / "train.csv"
    if kind == "parquet":
        table.to_parquet(folder / "train.parquet")
        return folder / "train.parquet"
    table.save_to_disk(folder / "saved")
    return folder / "saved"


TINY = ("--model", "tiny", "--clients", "2", "--budgets", "5MB", "--rounds", "1", "--steps", "1", "--threads", "1")


@pytest.mark.parametrize("kind", ["jsonl", "chat", "alpaca-json", "csv", "parquet", "saved"])
def test_each_format_and_record_shape_trains_a_round(tmp_path, kind):
    data = make(kind, tmp_path)
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--data", str(data), "--output-dir", str(out)) == 0
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["val_ppl"] is not None and line["train_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert str(data) in summary["data"] and "held out" in summary["data"]


def test_the_loss_mask_covers_exactly_the_response_and_end_of_text(tmp_path):
    tokenizer = byte_tokenizer()
    (record,) = to_records([{"prompt": "Q: cat\n", "response": "chat"}], tmp_path / "x.jsonl", Fields(),
                           tokenizer.eos_token)  # fmt: skip
    item, truncated = encode_record(record, tokenizer, 64)
    trained = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "chat" + tokenizer.eos_token and not truncated
    assert tokenizer.decode(item.input_ids) == "Q: cat\nchat" + tokenizer.eos_token


def test_the_chat_mask_covers_exactly_the_assistant_turns_with_their_end(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    (record,) = to_records([{"messages": CHATS[1]}], tmp_path / "x.jsonl", Fields(), tokenizer.eos_token)
    item, _ = encode_record(record, tokenizer, 256)
    trained = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
    eos = tokenizer.eos_token
    assert tokenizer.decode(trained) == f"4{eos}\n6{eos}\n"
    assert (
        tokenizer.decode(item.input_ids)
        == f"system: Be brief.\nuser: 2+2?\nassistant: 4{eos}\nuser: 3+3?\nassistant: 6{eos}\n"
    )


def test_long_records_keep_the_prompt_end_and_the_response_start(tmp_path):
    tokenizer = byte_tokenizer()
    (record,) = to_records([{"prompt": "abcdefghij", "response": "0123456789"}], tmp_path / "x.jsonl", Fields(),
                           tokenizer.eos_token)  # fmt: skip
    item, truncated = encode_record(record, tokenizer, 12)  # 10 + 11 tokens: the prompt is cut to 6 (half)
    assert truncated and tokenizer.decode(item.input_ids) == "efghij012345"
    assert sum(label != IGNORE_INDEX for label in item.labels) == 6


def test_one_file_per_client_gives_each_client_exactly_its_records(tmp_path):
    from hsplitlora.checks import load_config
    from hsplitlora.data.sources import load_training_data

    folder = tmp_path / "clients"
    folder.mkdir()
    sizes = {"a_site.jsonl": 4, "b_site.jsonl": 7, "c_site.jsonl": 5}
    for name, size in sizes.items():
        write_jsonl(folder / name, [{"prompt": f"{name} {i}: ", "response": f"r{i}"} for i in range(size)])
    val = write_jsonl(tmp_path / "val.jsonl", pairs_rows()[:3])
    config = load_config(None, {"model": "tiny", "client_data": str(folder), "val_data": str(val)})
    assert config.clients == 3
    tokenizer = byte_tokenizer()
    data = load_training_data(config, tokenizer)
    for shard, (name, size) in zip(data.shards, sorted(sizes.items()), strict=True):
        texts = sorted(tokenizer.decode(data.items[i].input_ids) for i in shard)
        assert texts == sorted(f"{name} {i}: r{i}{tokenizer.eos_token}" for i in range(size))
    assert len(data.validation) == 3
    out = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--client-data", str(folder), "--val-data", str(val), "--budgets", "5MB",
                   "--rounds", "1", "--steps", "1", "--output-dir", str(out)) == 0  # fmt: skip
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [c["client"] for c in line["clients"]] == [0, 1, 2]
    assert run_cli("run", "--model", "tiny", "--client-data", str(folder), "--clients", "2",
                   "--output-dir", str(tmp_path / "other")) == 2  # fmt: skip


def test_eval_of_a_run_on_your_own_data(tmp_path, capsys):
    data = make("chat", tmp_path)
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--data", str(data), "--output-dir", str(out)) == 0
    assert run_cli("eval", str(out), "--beams", "1", "--max-new-tokens", "4") == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["mrs"] == 2 and str(data) in result["data"]
    assert len((out / "predictions.txt").read_text().split("\n")) == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', "line 2 is not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "line 2 has no 'response'"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "  "}\n', "line 2 has an empty 'response'"),
        ('{"question": "a", "answer": "b"}\n', "unknown record shape"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1 has no assistant message"),
        ('{"messages": "hello"}\n', "line 1: 'messages' must be a non-empty list"),
        ("", "holds no records"),
    ],
)
def test_bad_data_is_one_sentence_and_writes_nothing(tmp_path, capsys, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--data", str(path), "--output-dir", str(out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err and message in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_client_file_with_no_usable_record_is_named(tmp_path, capsys):
    folder = tmp_path / "clients"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", pairs_rows()[:4])
    write_jsonl(folder / "b.jsonl", [{"prompt": "x", "response": ""}])
    args = ("run", "--model", "tiny", "--client-data", str(folder), "--budgets", "5MB", "--output-dir")
    assert run_cli(*args, str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'b.jsonl'} line 1 has an empty 'response'" in err and not (tmp_path / "run").exists()
    write_jsonl(folder / "b.jsonl", [{"prompt": "x", "response": "y"}])  # one record, none left to train on
    assert run_cli(*args, str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"client file {folder / 'b.jsonl'} holds 1 usable record(s)" in err and not (tmp_path / "run").exists()


def test_rows_come_back_as_written(tmp_path):
    rows = read_rows(make("parquet", tmp_path))
    assert rows[0] == {"prompt": PAIRS[0][0], "response": PAIRS[0][1]} and len(rows) == len(PAIRS)


def test_one_file_split_by_dirichlet_over_a_field_covers_every_training_record_once(tmp_path):
    from hsplitlora.checks import load_config
    from hsplitlora.data.sources import load_training_data

    rows = [{"prompt": f"q{i} ", "response": f"a{i}", "topic": ["food", "travel", "sport"][i % 3]} for i in range(60)]
    path = write_jsonl(tmp_path / "topics.jsonl", rows)
    config = load_config(None, {"model": "tiny", "data": str(path), "clients": 3, "partition": "dirichlet",
                                "partition_field": "topic", "dirichlet_alpha": 0.1, "val_size": 6})  # fmt: skip
    tokenizer = byte_tokenizer()
    data = load_training_data(config, tokenizer)
    assert len(data.validation) == 6 and len(data.items) == 54
    dealt = sorted(i for shard in data.shards for i in shard)
    assert dealt == list(range(54))  # every training record on exactly one client
    assert len(data.shards) == 3 and all(data.shards)
    with pytest.raises(Exception, match="partition dirichlet on your own data needs partition_field"):
        load_config(None, {"model": "tiny", "data": str(path), "partition": "dirichlet"})
