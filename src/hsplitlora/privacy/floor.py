"""The privacy floor of ARMSC (method.md section 10): with a bound lambda on leakage, only cuts
whose measured leakage L(s) is at most lambda are admissible, beside memory and time.

L(s) comes from a leakage curve measured for the model (`hsplitlora leakage RUN_DIR` writes one
into the run folder; benchmarks/leakage_curve.py the study's, docs/privacy/). Between measured
cuts the estimate is the larger of the two neighbours' values, past the deepest the deepest's:
leakage is not assumed to fall where it was not measured. The floor is the shallowest cut from
which every deeper cut is admissible, so it joins the planner as its shallowest cut (s_min).
In the standard split the main server also receives the labels, so L(s) is the recovery with
them."""

from __future__ import annotations

from pathlib import Path

from hsplitlora.errors import UsageError


def read_curve(path: str | Path, model: str, split_mode: str) -> dict[int, float]:
    """{cut: L(cut)} from a leakage report (leakage.json of a run) or a study's curve file,
    for `model` in `split_mode`; one sentence when it holds none."""
    from hsplitlora.reporting import read_json

    report = read_json(Path(path), "leakage curve")
    measured_for = report.get("model") if isinstance(report, dict) else None
    if measured_for != model:
        raise UsageError(f"the leakage curve {path} was measured for model {measured_for!r}, and this run uses "
                         f"{model!r}; measure one for it with hsplitlora leakage.")  # fmt: skip
    if isinstance(report.get(split_mode), list):  # a study's file: one curve per split mode
        points = report[split_mode]
    elif report.get("split_mode") == split_mode and isinstance(report.get("curve"), list):
        points = report["curve"]
    else:
        raise UsageError(f"the leakage curve {path} holds no curve for the {split_mode} split; measure one on a run "
                         f"with split_mode {split_mode}.")  # fmt: skip
    key = "token_recovery_with_labels" if split_mode == "standard" else "token_recovery"
    try:
        curve = {int(p["cut"]): float(p[key] if p.get(key) is not None else p["token_recovery"]) for p in points}
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"the leakage curve {path} has points without a cut and a token_recovery.") from None
    if not curve:
        raise UsageError(f"the leakage curve {path} has no measured cut.")
    return curve


def leakage_at(curve: dict[int, float], cut: int) -> float:
    """L(cut): measured, or the larger of the measured neighbours (past the deepest, its value)."""
    if cut in curve:
        return curve[cut]
    below = [c for c in curve if c < cut]
    above = [c for c in curve if c > cut]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    return max(curve[c] for c in near)


def leakage_floor(curve: dict[int, float], bound: float, deepest: int) -> int | None:
    """The shallowest cut s (1..deepest) with L(s') <= bound for every s' from s to deepest, or
    None when the deepest cut itself leaks more."""
    floor = None
    for cut in range(deepest, 0, -1):
        if leakage_at(curve, cut) > bound:
            break
        floor = cut
    return floor


def floor_s_min(config, deepest: int) -> tuple[int, str | None]:
    """The planner's shallowest cut under the config's privacy floor (its s_min without one), and
    a line saying what the floor admits. `config`: a RunConfig, or anything with its model,
    split_mode, s_min, max_leakage and leakage_curve."""
    if config.max_leakage is None:
        return config.s_min, None
    curve = read_curve(config.leakage_curve, config.model, config.split_mode)
    floor = leakage_floor(curve, config.max_leakage, deepest)
    if floor is None:
        lowest = min(leakage_at(curve, s) for s in range(1, deepest + 1))
        labels = (" (the labels alone give the main server the response's tokens; split_mode u keeps them)"
                  if config.split_mode == "standard" else "")  # fmt: skip
        raise UsageError(f"max_leakage {config.max_leakage:g} admits no cut: the curve {config.leakage_curve} "
                         f"measures at least {lowest:.3f} of the tokens recovered at every cut{labels}.")  # fmt: skip
    s_min = max(config.s_min, floor)
    return s_min, (f"privacy floor: leakage at most {config.max_leakage:g} admits cuts from {floor} on "
                   f"(L({floor}) = {leakage_at(curve, floor):.3f}); clients plan cuts from {s_min}.")  # fmt: skip
