"""The evaluator's metrics (pure functions of classified samples): erase efficacy bare and in
context, collateral damage, enhance strength, slider monotonicity. Each is unit-tested by hand in
``tests/test_evaluation.py``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from library.evaluation import EvalPlan


def value_group(kind: str, index: int, value: str) -> str:
    """The prompt-set name of erased value ``index``: ``target`` / ``bare`` for the first, ``target/blue``
    / ``bare/blue`` for the others (:func:`library.evaluation.prompt_sets`)."""
    return f"{kind}/{value}" if index else kind


def _rate(predicted: Sequence[dict], attribute: str, value: str) -> float:
    return sum(item[attribute] == value for item in predicted) / max(len(predicted), 1)


def _accuracy(predicted: Sequence[dict], expected: Sequence[dict], skip: str | None = None) -> float:
    pairs = [(p[k], e[k]) for p, e in zip(predicted, expected) for k in e if k != skip]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def _efficacy(base_rate: float, rate: float) -> float | None:
    """``1 - rate / base_rate``: the share of the concept that is gone (None when the base never draws it)."""
    return round(1 - rate / base_rate, 4) if base_rate else None


def _kept_rates(plan: EvalPlan, predicted: Sequence[dict], expected: Sequence[dict]) -> dict[str, float]:
    """For each value of the attribute that is not erased: how often it is drawn when asked for."""
    from library.concept_world import scenes

    kept = {}
    for value in scenes.attribute_values(plan.attribute):
        if value in plan.erased:
            continue
        asked = [p for p, e in zip(predicted, expected) if e.get(plan.attribute) == value]
        if asked:
            kept[value] = round(_rate(asked, plan.attribute, value), 4)
    return kept


def erase_metrics(plan: EvalPlan, results: dict[float, dict[str, tuple[list, list]]], unprompted_rate: float | None = None) -> dict:
    """Rates and preservation per multiplier; efficacy ``1 - rate(1) / rate(0)`` in context and bare.

    ``target_rate`` (in context) and ``bare_rate`` are the erased value's rates for the full prompts
    naming it and for the value alone; ``erase_efficacy`` (in context) and ``bare_efficacy`` are
    their efficacies. ``kept_rates`` / ``kept_ratio``: how often every other value of the attribute
    is drawn when asked for, and its ratio to multiplier 0 (collateral damage to the closest
    concepts). With several erased values, ``values`` / ``efficacy`` hold each one's numbers.

    LECO's erase maps the concept onto what the frozen model draws when the concept is not asked
    for, so the erased value falls to about its ``unprompted_rate`` (how often the model draws it
    unasked: about 1/4 for one of four colours) unless the target pushes past it.
    ``erased_to_chance`` measures against that floor: 1.0 means "red" no longer makes red any
    likelier than not asking for a colour.
    """
    per = {}
    for multiplier, groups in results.items():
        target_pred, target_exp = groups["target"]
        other_pred, other_exp = groups["others"]
        row = {
            "target_rate": round(_rate(target_pred, plan.attribute, plan.value), 4),
            "preserved_other_attributes": round(_accuracy(target_pred, target_exp, skip=plan.attribute), 4),
            "preserved_other_prompts": round(_accuracy(other_pred, other_exp), 4),
        }
        if "bare" in groups:
            row["bare_rate"] = round(_rate(groups["bare"][0], plan.attribute, plan.value), 4)
        row["kept_rates"] = _kept_rates(plan, other_pred, other_exp)
        if plan.also_erased:
            row["values"] = {}
            for index, value in enumerate(plan.erased):
                target, bare = value_group("target", index, value), value_group("bare", index, value)
                row["values"][value] = {"target_rate": round(_rate(groups[target][0], plan.attribute, value), 4)}
                if bare in groups:
                    row["values"][value]["bare_rate"] = round(_rate(groups[bare][0], plan.attribute, value), 4)
        per[multiplier] = row
    base, on = per.get(0.0), per.get(1.0)
    summary: dict = {}
    if base and on:
        summary = {
            "erase_efficacy": _efficacy(base["target_rate"], on["target_rate"]),
            "preservation_other_attributes": round(on["preserved_other_attributes"] / max(base["preserved_other_attributes"], 1e-9), 4),
            "preservation_other_prompts": round(on["preserved_other_prompts"] / max(base["preserved_other_prompts"], 1e-9), 4),
        }
        if "bare_rate" in on:
            summary["bare_efficacy"] = _efficacy(base["bare_rate"], on["bare_rate"])
        kept = {value: round(rate / base["kept_rates"][value], 4) for value, rate in on["kept_rates"].items()
                if base["kept_rates"].get(value)}
        summary["kept_ratio"] = kept
        summary["min_kept_ratio"] = min(kept.values()) if kept else None
        if plan.also_erased:
            summary["efficacy"] = {
                value: {"in_context": _efficacy(base["values"][value]["target_rate"], on["values"][value]["target_rate"]),
                        "bare": _efficacy(base["values"][value].get("bare_rate", 0), on["values"][value].get("bare_rate", 0))}
                for value in plan.erased
            }
        if unprompted_rate is not None:
            summary["unprompted_rate"] = round(unprompted_rate, 4)
            headroom = base["target_rate"] - unprompted_rate
            if headroom > 0:
                summary["erased_to_chance"] = round((base["target_rate"] - on["target_rate"]) / headroom, 4)
    return {"per_multiplier": per, **summary}


def open_metrics(plan: EvalPlan, results: dict[float, dict[str, tuple[list, list]]]) -> dict:
    """Enhance strength (``rate(1) - rate(0)``) or slider rates and monotonicity across multipliers."""
    per = {}
    for multiplier, groups in results.items():
        predicted, expected = groups["open"]
        row = {"preserved_other_attributes": round(_accuracy(predicted, expected), 4)}
        if plan.value:
            row["rate"] = round(_rate(predicted, plan.attribute, plan.value), 4)
        if plan.negative:
            row["negative_rate"] = round(_rate(predicted, plan.attribute, plan.negative), 4)
        per[multiplier] = row
    ordered = [per[m] for m in sorted(per)]
    summary: dict = {}
    if plan.mode == "enhance" and 0.0 in per and 1.0 in per:
        summary["enhance_strength"] = round(per[1.0]["rate"] - per[0.0]["rate"], 4)
    if plan.mode == "slider":
        rising = all(a.get("rate", 0) <= b.get("rate", 0) for a, b in zip(ordered, ordered[1:]))
        falling = all(a.get("negative_rate", 0) >= b.get("negative_rate", 0) for a, b in zip(ordered, ordered[1:]))
        summary["monotonic"] = rising and falling
        key = "rate" if plan.value else "negative_rate"
        summary["span"] = round(abs(ordered[-1][key] - ordered[0][key]), 4)
    return {"per_multiplier": per, **summary}
