"""E2E data: the loss mask, partitioning and padding-aware batching."""

from __future__ import annotations

import pytest

from hsplitlora.data.e2e import IGNORE_INDEX, Batcher, Example, encode, partition_iid, read_e2e
from hsplitlora.errors import UsageError


def test_loss_mask_covers_exactly_reference_and_end_of_text(tokenizer, train_examples):
    for example in train_examples[:50]:
        item = encode(example, tokenizer, 10_000)
        target = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
        prompt = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label == IGNORE_INDEX]
        assert [label for label in item.labels if label != IGNORE_INDEX] == target
        assert tokenizer.decode(target) == " " + example.ref + tokenizer.eos_token
        assert tokenizer.decode(prompt) == example.mr + " ||"
        # Masked positions form one contiguous tail: the prompt comes first, the target last.
        first = next(i for i, label in enumerate(item.labels) if label != IGNORE_INDEX)
        assert all(label != IGNORE_INDEX for label in item.labels[first:])


def test_truncation_keeps_the_mask_aligned(tokenizer):
    item = encode(Example("name[X]", "A long reference " * 20), tokenizer, 40)
    assert len(item.input_ids) == len(item.labels) == 40


def test_a_file_is_encoded_as_one_example_at_a_time_and_once_a_process(tokenizer, tmp_path):
    import os

    from hsplitlora.data import e2e

    path = tmp_path / "devset.csv"
    path.write_text('mr,ref\n"name[A], food[Thai]",A serves Thai food.\n"name[B]",B is a pub that stays open late.\n')
    examples, encoded = e2e.encoded_file(path, tokenizer, 12)
    assert encoded == [encode(e, tokenizer, 12) for e in read_e2e(path)] and examples == read_e2e(path)
    assert len(encoded[1].input_ids) == 12  # truncated as encode() truncates
    assert e2e.encoded_file(path, tokenizer, 12)[1][0] is encoded[0]  # the second read is the first's
    assert e2e.encoded_file(path, tokenizer, 12, limit=1)[1] == encoded[:1]
    path.write_text('mr,ref\n"name[C]",C is near the river.\n')
    os.utime(path, ns=(1, 1))  # a changed file is read again, whatever its time
    changed = encode(Example("name[C]", "C is near the river."), tokenizer, 12)
    assert e2e.encoded_file(path, tokenizer, 12)[1] == [changed]


def test_batches_are_right_padded_and_padding_never_counts(tokenizer, train_examples):
    items = [encode(e, tokenizer, 200) for e in train_examples[:64]]
    batcher = Batcher(items, batch_size=8, pad_id=tokenizer.pad_token_id, seed=0)
    total_padding = 0
    for _ in range(8):
        batch = next(batcher)
        lengths = batch.attention_mask.sum(1)
        assert batch.input_ids.shape[1] == int(lengths.max())
        for row, n in enumerate(lengths.tolist()):
            assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
            assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        total_padding += int((batch.attention_mask == 0).sum())
    # Sorting within pools keeps padding small compared with random batches of the same data.
    random_padding = sum(
        max(len(items[j].input_ids) for j in range(i, i + 8)) * 8
        - sum(len(items[j].input_ids) for j in range(i, i + 8))
        for i in range(0, 64, 8)
    )
    assert total_padding < random_padding


def test_batch_order_is_fixed_by_the_seed(tokenizer, train_examples):
    items = [encode(e, tokenizer, 200) for e in train_examples[:40]]
    first = [next(Batcher(items, 4, 0, seed=3)).input_ids for _ in range(1)]
    again = [next(Batcher(items, 4, 0, seed=3)).input_ids for _ in range(1)]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))


def test_iid_partition_covers_every_example_once():
    shards = partition_iid(103, 5, seed=1)
    assert sorted(i for shard in shards for i in shard) == list(range(103))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert partition_iid(103, 5, seed=1) == shards and partition_iid(103, 5, seed=2) != shards


def test_bad_data_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_e2e(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("mr,ref\n")
    with pytest.raises(UsageError, match="holds no examples"):
        read_e2e(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="needs the columns"):
        read_e2e(wrong)
