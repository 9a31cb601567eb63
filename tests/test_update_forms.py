"""NAA's down-link forms (method.md section 6): a receiver sent the stacked change without its own
term rebuilds it bit for bit; SVD with error feedback loses nothing over rounds, only delays it;
every byte of every form is counted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import AdapterFactors, ExactChange, StackedDelta, TruncatedChange, term_rows
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.messages import AdapterUpload, OwnTerm, PartialStack
from hsplitlora.rounds import run

D_OUT, D_IN = 48, 40


def uploads_of(round_: int, ranks: list[int], seed: int) -> list[AdapterUpload]:
    """One candidate "w" trained by every client; after round 1 each anchor is held by the fed server."""
    generator = torch.Generator().manual_seed(seed)
    uploads = []
    for client, rank in enumerate(ranks):
        a = torch.randn(rank, D_IN, generator=generator)
        b = torch.randn(D_OUT, rank, generator=generator)
        factors = AdapterFactors(client, 4 + client, a, b, 16.0 / rank, "zero" if round_ == 1 else "held")
        uploads.append(AdapterUpload(client, factors.samples, {"w": factors}))
    return uploads


@pytest.mark.parametrize("compression", ["fp32", "bf16", "fp16", "int8"])
def test_a_receiver_rebuilds_the_whole_stack_from_the_other_rows_bit_for_bit(compression):
    fed = FedServer(ExactChange(), compression)
    fed.aggregate(1, uploads_of(1, [2, 3, 4], seed=0))
    previous = dict(fed.previous)
    second = uploads_of(2, [2, 3, 4], seed=1)
    whole = fed.aggregate(2, second)
    for receiver in range(3):
        sent = fed.update_for(whole, {"w"}, {"w": {receiver}})
        partial = sent.deltas["w"]
        assert isinstance(partial, PartialStack)
        assert sum(isinstance(piece, OwnTerm) for piece in partial.pieces) == 1
        own = second[receiver].factors["w"]

        def rows(term: OwnTerm, own=own, receiver=receiver):
            return term_rows(term.weight, own.scale, own.a, own.b, previous[(receiver, "w")])

        rebuilt = partial.rebuild(rows)
        assert torch.equal(rebuilt.b, whole.deltas["w"].b) and torch.equal(rebuilt.a, whole.deltas["w"].a)
        # The receiver's own rows (2 r_i of them, with its anchor's) did not travel.
        assert sent.nbytes() < whole.nbytes()
    # A receiver holding no term of the candidate gets the whole stack.
    assert fed.update_for(whole, {"w"}, {}).deltas["w"] is whole.deltas["w"]


def test_svd_error_feedback_sends_rank_k_and_loses_nothing_over_rounds():
    exact, truncated = FedServer(ExactChange()), FedServer(TruncatedChange(rank=3))
    exact_sum, sent_sum = torch.zeros(D_OUT, D_IN), torch.zeros(D_OUT, D_IN)
    for round_ in range(1, 6):
        uploads = uploads_of(round_, [4, 8, 8], seed=round_)
        change = exact.aggregate(round_, uploads).deltas["w"]
        exact_sum += change if isinstance(change, torch.Tensor) else change.dense()
        update = truncated.aggregate(round_, uploads)
        sent = update.deltas["w"]
        assert isinstance(sent, StackedDelta) and sent.b.shape[1] == 3  # rank k on the wire
        assert update.nbytes() == 3 * (D_IN + D_OUT) * 4
        sent_sum += sent.dense()
        total = sent_sum + truncated.residual["w"]
        assert torch.linalg.norm(total - exact_sum) <= 1e-5 * torch.linalg.norm(exact_sum)
    # Something was held back: the residual is not zero, and the truncated sum is not the exact one.
    assert torch.linalg.norm(truncated.residual["w"]) > 1e-3 * torch.linalg.norm(exact_sum)


def test_an_energy_threshold_lowers_the_rank_sent():
    low = torch.randn(D_OUT, 2) @ torch.randn(2, D_IN)  # rank 2: all its energy in 2 directions
    left, right = TruncatedChange(rank=10, energy=0.999).truncate(low)
    assert left.shape[1] == 2 and right.shape[0] == 2
    torch.testing.assert_close(left @ right, low, atol=1e-4, rtol=1e-4)


def test_the_time_model_counts_the_form_each_receiver_gets():
    exact = ExactChange()
    # 3 anchored adapters of rank 2 on a 64 x 64 matrix: 12 rows of 128 values, less 4 own rows + its weight.
    assert exact.values_down(64, 64, [2, 2, 2], True) == 12 * 128
    assert exact.values_down(64, 64, [2, 2, 2], True, own=2) == 8 * 128 + 2
    assert exact.values_down(64, 64, [16, 16, 16], True, own=16) == 64 * 64  # dense: the whole stack is larger
    assert TruncatedChange(rank=4).values_down(64, 64, [16, 16, 16], True, own=16) == 4 * 128


def tiny(tmp_path, name: str, **changes) -> RunConfig:
    values = dict(model="tiny", clients=3, rounds=2, local_steps=2, split_point=[1, 2, 3], rank=2, val_size=16,
                  batch_size=4, budgets="5MB,8MB,20MB", output_dir=str(tmp_path / name))  # fmt: skip
    return RunConfig(**{**values, **changes})


@pytest.mark.parametrize(
    ("engine", "changes"),
    # (Ray holders rebuild the same way: the driver leaves the terms out for both engines, and
    # tests/test_golden.py's ray cases equal the in-process metrics.)
    [("inprocess", {}), ("inprocess", {"split_mode": "u", "split_point": [1, 2, 2]})],
)
def test_every_merged_weight_is_bit_identical_without_the_own_terms(tmp_path, monkeypatch, engine, changes):
    if engine == "ray":
        pytest.importorskip("ray")
    own_free = run(tiny(tmp_path, "own-free", engine=engine, **changes))
    with monkeypatch.context() as patch:  # the reference: every copy sent the whole stack, as before
        patch.setattr(FedServer, "update_for", lambda self, update, names, held: update)
        whole = run(tiny(tmp_path, "whole", engine=engine, **changes))
    weights = load_file(own_free.run_dir / "model.safetensors")
    reference = load_file(whole.run_dir / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    assert [m["val_loss"] for m in own_free.metrics] == [m["val_loss"] for m in whole.metrics]
    # The saving is real: each client downloads less, each round.
    for line, full in zip(own_free.metrics, whole.metrics, strict=True):
        for client, client_full in zip(line["clients"], full["clients"], strict=True):
            assert client["bytes_adapters_down"] < client_full["bytes_adapters_down"]


def test_svd_ef_resumes_exactly_with_its_residual(tmp_path):
    straight = run(tiny(tmp_path, "straight", rounds=3, update_form="svd-ef", update_rank=1))
    run(tiny(tmp_path, "resumed", rounds=2, update_form="svd-ef", update_rank=1))
    resumed = run(tiny(tmp_path, "resumed", rounds=3, update_form="svd-ef", update_rank=1), resume=True)
    drop = ("wall_time_s", "round_wall_time_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed.metrics[2:]] == [
        {k: v for k, v in m.items() if k not in drop} for m in straight.metrics[2:]
    ]
    exact = run(tiny(tmp_path, "exact", rounds=3))
    assert resumed.metrics[-1]["val_loss"] != exact.metrics[-1]["val_loss"]  # rank 1 did truncate
    assert resumed.metrics[-1]["bytes_down"] < exact.metrics[-1]["bytes_down"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"update_form": "svd"}, "update_form 'svd' is unknown; choose exact or svd-ef."),
        ({"update_rank": 0}, "update_rank must be a positive integer, got 0."),
        ({"update_energy": 1.5}, "update_energy must be in (0, 1]"),
    ],
)
def test_a_bad_update_setting_is_refused_with_one_sentence(changes, message):
    with pytest.raises(UsageError) as error:
        RunConfig(model="tiny", **changes).validate()
    assert message in str(error.value)


def test_svd_ef_is_refused_for_a_strategy_that_averages_factors(tmp_path):
    with pytest.raises(UsageError, match="update_form svd-ef truncates NAA's exact change, and hetlora"):
        run(RunConfig(model="tiny", strategy="hetlora", update_form="svd-ef", output_dir=str(tmp_path / "h")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--update-form", "svd"), "update_form 'svd' is unknown; choose exact or svd-ef."),
        (("--strategy", "hetlora", "--update-form", "svd-ef"), "and hetlora aggregates otherwise"),
    ],
)
def test_the_cli_refuses_a_bad_update_setting_with_exit_2(args, message, capsys, tmp_path):
    from hsplitlora.cli import main

    assert main(["run", "--model", "tiny", "--steps", "1", "--output-dir", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
