"""Leakage at the cut: the main server's attack recovers a tiny model's tokens far better than
chance, from the messages a run's clients really send (their training batches, the run's final
weights and compression), with prompt and response counted apart; the standard split's labels
are the response; bad input is one sentence and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hsplitlora.cli import main
from hsplitlora.compression import pack
from hsplitlora.data.e2e import IGNORE_INDEX, client_batchers
from hsplitlora.data.sources import load_training_data
from hsplitlora.evaluation.run_eval import load_run_model, run_config
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import load_model
from hsplitlora.models.split import ClientPart
from hsplitlora.privacy.leakage import capture, hidden_at_cuts, measure_leakage

SMALL = {"batches": 2, "public_rows": 120, "steps": 150}


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


def tiny_run(folder, *extra: str) -> str:
    assert run_cli("run", "--model", "tiny", "--clients", "2", "--rounds", "1", "--steps", "3", "--val-size", "8",
                   "--split-point", "2", "--rank", "4", "--output-dir", str(folder), *extra) == 0  # fmt: skip
    return str(folder)


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("leakage") / "standard", "--compression", "int8")


@pytest.fixture(scope="module")
def u_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("leakage") / "u", "--split-mode", "u")


def test_the_attack_recovers_far_more_tokens_than_chance_and_the_labels_give_the_response(standard_run):
    report = measure_leakage(standard_run, [1, 2], **SMALL)
    assert [e["cut"] for e in report["cuts"]] == [1, 2]
    for entry in report["cuts"]:
        learned, chance = entry["learned"], entry["chance"]
        assert chance["all"] < 0.3  # the public text's most frequent byte
        assert learned["prompt"] > 0.8 and learned["response"] > 0.8 and learned["all"] > chance["all"] + 0.5
        assert learned["rouge_l"] > 0.5
        # The labels are the response's token ids: with them the response is read exactly.
        assert entry["with_labels"]["response"] == 1.0
        assert entry["with_labels"]["all"] >= entry[entry["best"]]["all"]
    assert [point["cut"] for point in report["curve"]] == [1, 2]
    assert report["curve"][0]["token_recovery"] == max(report["cuts"][0][a]["all"] for a in ("learned", "nearest"))


def test_the_attacked_messages_are_the_runs_own_batches_weights_and_compression(standard_run):
    saved, sent, num_blocks, tokenizer = capture(standard_run, [2], batches=2)
    config = run_config(saved)
    data = load_training_data(config, tokenizer)
    final, _ = load_run_model(standard_run)
    base = load_model("tiny", seed=config.seed)
    orders = {}
    for cid, shard in enumerate(data.shards):
        items = [data.items[i] for i in shard]
        orders[cid] = client_batchers(items, config.batch_size, tokenizer.pad_token_id, config.seed, cid)[0]
    assert sorted({item.client for item in sent}) == [0, 1] and len(sent) == 4
    for item in sent:
        expected = next(orders[item.client])  # the client's own training order: round 1's batches, in order
        assert torch.equal(item.truth.input_ids, expected.input_ids)
        assert torch.equal(item.message.labels, expected.labels)  # standard split: the labels cross
        ids, mask = expected.input_ids, expected.attention_mask
        with torch.no_grad():
            trained = ClientPart(architecture_of(final.model), final.model, 2)(ids, mask)
            untrained = ClientPart(architecture_of(base.model), base.model, 2)(ids, mask)
        assert item.message.hidden.mode == "int8"
        assert torch.equal(item.message.hidden.unpack(), pack(trained, "int8").unpack())
        assert not torch.equal(item.message.hidden.unpack(), pack(untrained, "int8").unpack())


def test_prompt_and_response_are_counted_apart_and_the_u_shape_sends_no_labels(u_run):
    saved, sent, _, _ = capture(u_run, [1], batches=2)
    assert saved["split_mode"] == "u" and all(item.message.labels is None for item in sent)
    report = measure_leakage(u_run, [1], **SMALL)
    (entry,) = report["cuts"]
    assert "with_labels" not in entry and report["curve"][0]["token_recovery_with_labels"] is None
    prompts = sum(int((i.truth.attention_mask.bool() & (i.truth.labels == IGNORE_INDEX)).sum()) for i in sent)
    responses = sum(int((i.truth.labels != IGNORE_INDEX).sum()) for i in sent)
    assert prompts > 0 and responses > 0 and prompts + responses == report["tokens_per_cut"]
    assert responses == report["response_tokens_per_cut"]
    assert entry["learned"]["all"] > entry["chance"]["all"] + 0.5


def test_the_attackers_pass_is_the_clients_forward():
    loaded = load_model("tiny", seed=3)
    ids = torch.randint(0, 250, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    found = hidden_at_cuts(loaded.model, ids, mask, [1, 3])
    for cut in (1, 3):
        assert torch.equal(found[cut], ClientPart(architecture_of(loaded.model), loaded.model, cut)(ids, mask))


def test_the_command_writes_a_curve_and_bad_input_is_one_sentence(standard_run, tmp_path, capsys):
    assert run_cli("leakage", standard_run, "--cuts", "1", "--batches", "1", "--public-rows", "60",
                   "--attack-steps", "60", "--threads", "1") == 0  # fmt: skip
    written = json.loads(Path(standard_run, "leakage.json").read_text())
    assert written["curve"][0]["cut"] == 1 and 0 <= written["curve"][0]["token_recovery"] <= 1
    assert "leakage.json" in capsys.readouterr().out
    for args, message in (
        ((str(tmp_path / "nothing"),), "is not a finished run folder"),
        ((standard_run, "--cuts", "4"), "split point 4 is out of range"),
        ((standard_run, "--cuts", "0,1"), "split point 0 is out of range"),
        ((standard_run, "--cuts", "one"), "are not whole numbers"),
        ((standard_run, "--batches", "0"), "batches must be a positive integer"),
    ):
        assert run_cli("leakage", *args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("split_mode", ["standard", "u"])
def test_a_standard_split_run_on_own_data_says_the_main_server_receives_the_labels(split_mode, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}:", "response": w}) + "\n" for w in ["yes", "no"] * 8))
    assert run_cli("run", "--model", "tiny", "--clients", "2", "--rounds", "1", "--steps", "1", "--threads", "1",
                   "--split-point", "1", "--split-mode", split_mode, "--data", str(data),
                   "--output-dir", str(tmp_path / "run")) == 0  # fmt: skip
    said = capsys.readouterr().err.count("the main server receives the labels")
    assert said == (1 if split_mode == "standard" else 0)
    if split_mode == "u":
        return
    # The attacker's text for a run on your own data is the user's to give.
    assert run_cli("leakage", str(tmp_path / "run"), "--cuts", "1", "--batches", "1") == 2
    assert "give --public-text FILE" in capsys.readouterr().err
    public = tmp_path / "public.txt"
    public.write_text("".join(f"Say {w}: {w}\n" for w in ["yes", "no", "maybe"] * 10))
    assert run_cli("leakage", str(tmp_path / "run"), "--cuts", "1", "--batches", "1", "--public-text", str(public),
                   "--attack-steps", "100") == 0  # fmt: skip
    report = json.loads((tmp_path / "run" / "leakage.json").read_text())
    assert report["attacker"]["public_text"] == f"30 lines of {public}" and report["cuts"][0]["with_labels"]


def test_an_attacker_holding_the_runs_weights_reads_what_the_public_model_cannot(tmp_path):
    # A large learning rate moves the client's blocks far from the public model the attacker knows.
    far = tiny_run(tmp_path / "far", "--lr", "0.05")
    public = measure_leakage(far, [1], **SMALL)["cuts"][0]
    informed = measure_leakage(far, [1], **SMALL, informed=True)
    assert informed["attacker"]["model_weights"] == "the run's final"
    assert public["learned"]["all"] < 0.5 < 0.9 < informed["cuts"][0]["learned"]["all"]


def test_noise_on_the_activations_is_what_the_attacker_sees_and_trains_under(tmp_path):
    # A tiny model's activations after block 1 have per-example norms of a few hundred at most here;
    # clipped to 5 and drowned in noise of scale 5 per coordinate, the attack falls towards chance.
    noisy = tiny_run(tmp_path / "noisy", "--split-mode", "u", "--dp-activations-sigma", "1.0", "--dp-clip", "5")
    saved, sent, _, _ = capture(noisy, [1], batches=1)
    assert all(float(item.message.hidden.unpack().reshape(item.message.hidden.shape[0], -1).norm(dim=1).min()) > 5
               for item in sent)  # fmt: skip  # what crossed is the clipped activation plus noise, not the clean one
    report = measure_leakage(noisy, [1], **SMALL)
    assert report["attacker"]["trained_under_noise"] == [1.0, 5.0]
    clean = measure_leakage(tiny_run(tmp_path / "clean", "--split-mode", "u"), [1], **SMALL)
    assert report["curve"][0]["token_recovery"] < clean["curve"][0]["token_recovery"] - 0.3
