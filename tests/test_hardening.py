"""Random and malformed values for every setting: a clear UsageError (exit 2 from the CLI), never a
traceback."""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsplitlora.checks import load_config
from hsplitlora.cli import main
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError

FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["1GB", "-3", "0", "tiny", "iid", "q,k", "nan", "1e400"]),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=8)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=4))
def test_any_config_value_is_accepted_or_refused_with_a_sentence(changes):
    try:
        config = load_config(None, changes)
    except UsageError as error:
        message = str(error)
        assert message.endswith(".") and "\n" not in message and len(message) < 400
    else:
        assert isinstance(config, RunConfig)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=3))
def test_a_malformed_config_file_exits_2_from_the_cli(tmp_path_factory, capsys, changes):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump({**changes, "rounds": 0}))  # rounds 0 makes every file invalid
    try:
        code = main(["run", "--config", str(path)])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--clients", "--rounds", "--steps", "--rank", "--split-point", "--lr", "--alpha", "--seed",
                          "--budgets", "--server-budget", "--batch-size", "--partition", "--strategy", "--targets",
                          "--device-preset", "--dirichlet-alpha", "--val-size", "--eval-every", "--compression",
                          "--split-mode", "--tail-blocks", "--data", "--val-data", "--client-data", "--dtype",
                          "--device", "--client-device", "--server-device", "--prompt-field", "--partition-field",
                          "--split-rule", "--adapter-lifecycle"]),
    text=st.text(alphabet="-0123456789.,abcxyzGBMiK e", min_size=1, max_size=10),
)  # fmt: skip
def test_any_flag_text_exits_2_or_passes_validation(capsys, flag, text):
    try:
        code = main(["run", flag, text, "--model", "no-such-model"])  # valid values stop at the model
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


FLAG_TEXT = st.text(alphabet="-0123456789.,abcxyzGBMiK enaqvf", min_size=0, max_size=10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--budgets", "--server-budget", "--batch-size", "--seq-len", "--targets", "--levels", "--rho",
                          "--s-min", "--tail-blocks", "--split-rule", "--local-steps", "--server-flops",
                          "--warmup-batches", "--seed", "--dtype", "--max-seq-len", "--rank-levels"]),
    text=FLAG_TEXT,
)  # fmt: skip
def test_any_plan_flag_text_exits_2_or_passes_validation(capsys, flag, text):
    budgets = [] if flag == "--budgets" else ["--budgets", "20MB"]
    try:
        code = main(["plan", "--model", "no-such-model", *budgets, flag, text])  # valid values stop at the model
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--strategies", "--target-ppl", "--clients", "--rounds", "--steps", "--budgets", "--seed",
                          "--rank", "--split-point", "--targets", "--lr", "--split-mode", "--compression"]),
    text=FLAG_TEXT,
)  # fmt: skip
def test_any_compare_flag_text_exits_2_or_passes_validation(tmp_path_factory, capsys, flag, text):
    strategies = [] if flag == "--strategies" else ["--strategies", "hsplitlora,splitlora"]
    out = tmp_path_factory.mktemp("compare") / "out"
    try:
        code = main(["compare", "--model", "no-such-model", *strategies, "--output-dir", str(out), flag, text])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
