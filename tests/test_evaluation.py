"""Evaluation: the official E2E scorer's figures, hand-checked metric cases, perplexity, generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hsplitlora.cli import main
from hsplitlora.data.e2e import collate, data_file, encode, read_e2e
from hsplitlora.evaluation.e2e_metrics import bleu, nist, read_references, score_e2e
from hsplitlora.evaluation.generation import GenerationSettings, generate
from hsplitlora.evaluation.perplexity import evaluate_loss, model_forward, perplexity
from hsplitlora.models.loading import load_model

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e-scorer-example"
EXAMPLE_FIGURES = {"BLEU": 0.7203, "NIST": 7.8212, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}


def test_official_scorer_example_to_every_printed_decimal(capsys):
    refs, hyp = str(EXAMPLE / "devel-conc.txt"), str(EXAMPLE / "baseline-output.txt")
    assert main(["score", refs, hyp, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {name: round(value, 4) for name, value in scores.items()} == EXAMPLE_FIGURES
    assert main(["score", refs, hyp]) == 0
    printed = capsys.readouterr().out
    for name, value in EXAMPLE_FIGURES.items():
        assert f"{name}: {value:.4f}" in printed


REFS = [
    ["The Eagle is a coffee shop near the river.", "Near the river, The Eagle serves coffee."],
    ["Alimentum serves cheap Italian food in the city centre."],
    ["Zizzi is a family friendly pub with a high rating."],
]


def test_identical_output_gets_the_maximum():
    identical = [refs[0] for refs in REFS]
    other = ["The Eagle is a shop.", "Alimentum serves food.", "Zizzi is a pub."]
    best, worse = score_e2e(REFS, identical), score_e2e(REFS, other)
    assert best["BLEU"] == pytest.approx(1.0)
    assert best["ROUGE_L"] == pytest.approx(1.0)
    assert best["METEOR"] > 0.9
    for name in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
        assert best[name] > worse[name], name


def test_one_meteor_process_serves_every_score_and_a_dead_one_is_replaced():
    from hsplitlora.evaluation import e2e_metrics

    outputs = [refs[0] for refs in REFS]
    first = score_e2e(REFS, outputs)
    process = e2e_metrics.meteor_scorer().meteor_p
    assert score_e2e(REFS, outputs) == first and e2e_metrics.meteor_scorer().meteor_p is process
    process.kill()
    process.wait()
    assert score_e2e(REFS, outputs) == first and e2e_metrics.meteor_scorer().meteor_p is not process
    e2e_metrics.close_meteor()
    assert e2e_metrics._meteor is None


def test_output_sharing_no_word_gets_only_mtevals_smoothed_bleu_and_zero_rouge():
    unrelated = ["xylophone quartz", "zebra marmalade", "vortex banjo"]
    scores = score_e2e(REFS, unrelated)
    # mteval smooths an order without matches by 1 / 2^k: mteval-v13a prints BLEU 0.0053 here.
    assert round(scores["BLEU"], 4) == 0.0053 and scores["ROUGE_L"] == 0.0 and scores["NIST"] == 0.0
    assert scores["CIDEr"] == 0.0


CHECK = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e-scorer-check"


@pytest.mark.parametrize("system, figures", [("truncated-output.txt", (0.6774, 4.0344)),
                                             ("padded-output.txt", (0.6354, 9.2558))])  # fmt: skip
def test_bleu_and_nist_equal_the_official_scorer_on_short_and_long_outputs(system, figures):
    from hsplitlora.evaluation.e2e_metrics import read_outputs

    refs, outputs = read_references(CHECK / "refs.txt"), read_outputs(CHECK / system)
    assert (round(bleu(refs, outputs), 4), round(nist(refs, outputs), 4)) == figures


def test_cumulative_scores_per_order_equal_mtevals():
    from hsplitlora.evaluation.e2e_metrics import read_outputs

    refs = read_references(CHECK / "refs.txt")
    truncated, padded = read_outputs(CHECK / "truncated-output.txt"), read_outputs(CHECK / "padded-output.txt")
    assert [round(nist(refs, truncated, order=n), 4) for n in range(1, 6)] == [1.7895, 2.6290, 3.2411, 3.7023, 4.0344]
    assert [round(bleu(refs, padded, order=n), 4) for n in range(1, 5)] == [0.6757, 0.6543, 0.6431, 0.6354]


# Hand-made cases for the length penalties, with what mteval-v13a-sig.pl (the official E2E
# scorer's BLEU and NIST, run on these inputs) prints for them.
EAGLE = [
    "The Eagle is a cheap coffee shop near the river.",
    "Near the river there is a cheap coffee shop called The Eagle.",
]
MILL = [
    "The Mill is a pub in the city centre serving Indian food.",
    "Serving Indian food, The Mill pub is in the city centre.",
]
ZIZZI = ["Zizzi is a family friendly restaurant.", "Zizzi is a restaurant for families, with low prices and a high "
         "customer rating, located by the riverside near the bridge."]  # fmt: skip
LENGTH_CASES = {
    "an output of one word": ([EAGLE, MILL, ZIZZI], ["Eagle", "pub", "Zizzi"], (0.0001, 0.0000)),
    "an output longer than every reference": (
        [EAGLE, MILL, ZIZZI],
        ["The Eagle is a cheap coffee shop near the river. It is cheap. Near the river there is a cheap coffee shop "
         "called The Eagle, which is cheap.",
         "The Mill is a pub in the city centre serving Indian food. Serving Indian food, The Mill pub is in the city "
         "centre, and it is a pub.",
         "Zizzi is a restaurant for families, with low prices and a high customer rating, located by the riverside "
         "near the bridge, and Zizzi is a family friendly restaurant."],
        (0.6148, 3.6884),
    ),
    "references of very different lengths": (
        [["Zizzi is a pub.", "Zizzi is a pub with a high customer rating and low prices, located in the riverside area "
          "near the bridge, serving English food to families.", "Zizzi pub."],
         ["The Mill is a pub in the city centre serving Indian food."]],
        ["Zizzi is a pub with low prices near the bridge.", "The Mill serves Indian food."],
        (0.4315, 2.9859),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LENGTH_CASES))
def test_length_penalties_equal_the_official_scorer(case):
    refs, outputs, figures = LENGTH_CASES[case]
    assert (round(bleu(refs, outputs), 4), round(nist(refs, outputs), 4)) == figures


def test_nist_by_hand_on_a_single_word():
    # One instance, reference "a b", output "a": info(a) = -log2(1/2) = 1, one output unigram,
    # length ratio 1/2 gives the penalty exp(-beta ln^2 0.5).
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert nist([["a b"]], ["a"]) == pytest.approx(1.0 * math.exp(-beta * math.log(0.5) ** 2))
    assert bleu([["a b c d e"]], ["a b c d e"]) == pytest.approx(1.0)


def test_csv_references_group_rows_by_mr(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text('mr,ref\n"name[A]",First A.\n"name[B]",Only B.\n"name[A]",Second A.\n')
    assert read_references(path) == [["First A.", "Second A."], ["Only B."]]


@pytest.mark.parametrize(
    "refs_text, hyp_text, message",
    [
        ("a\n\nb\n", "one\n", "there are 2 reference instances but 1 outputs"),
        ("a\n", "", "is empty"),
        ("", "x\n", "holds no references"),
    ],
)
def test_score_bad_input_exits_2(tmp_path, capsys, refs_text, hyp_text, message):
    refs, hyp = tmp_path / "refs.txt", tmp_path / "hyp.txt"
    refs.write_text(refs_text)
    hyp.write_text(hyp_text)
    assert main(["score", str(refs), str(hyp)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_score_unreadable_files_exit_2(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing.txt"), str(tmp_path / "x.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa\x00")
    assert main(["score", str(binary), str(binary)]) == 2
    assert "cannot be read as UTF-8" in capsys.readouterr().err


def test_perplexity_is_exp_of_the_mean_target_token_loss(tokenizer):
    loaded = load_model("tiny")
    examples = read_e2e(data_file(None, "test"))[:10]
    batches = [collate([encode(e, tokenizer, 128) for e in examples[i : i + 4]], tokenizer.pad_token_id)
               for i in range(0, 10, 4)]  # fmt: skip
    mean, count = evaluate_loss(model_forward(loaded.model), batches)
    # Independently: every target token's negative log-probability, one by one.
    losses = []
    with torch.no_grad():
        for batch in batches:
            logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            for row in range(batch.input_ids.shape[0]):
                for t in range(1, batch.input_ids.shape[1]):
                    if batch.labels[row, t] != -100:
                        losses.append(-float(logprobs[row, t - 1, batch.labels[row, t]]))
    assert count == len(losses)
    assert perplexity(mean) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_generation_gives_one_line_per_mr_and_is_deterministic():
    mrs = ["name[The Eagle], eatType[coffee shop]", "name[Zizzi], food[Italian], area[riverside]", "name[X]"]
    settings = GenerationSettings(num_beams=3, max_new_tokens=12, batch_size=2)
    first = generate(load_model("tiny", seed=3).model, load_model("tiny").tokenizer, mrs, settings)
    again = generate(load_model("tiny", seed=3).model, load_model("tiny").tokenizer, mrs, settings)
    assert len(first) == len(mrs) and first == again
    assert all("\n" not in line for line in first)
