"""Which candidates ``compress`` tries, in which order, and which one it keeps.

``quantize.strategy: fixed`` builds the configured precision (plain int8 first and int8 with float
fallback only when a budget is set and plain int8 misses it); ``auto`` climbs a ladder of precisions
(int8, int8 + float fallback, bf16, fp32) for the original network and, with a ``prune`` section, for
each pruning ratio from the smallest up. The fastest candidate within the budget and fidelity limits
wins; when none is, the error says what each one measured and what to change.
"""

from __future__ import annotations

from efficientbioai.compress.budget import Budget
from efficientbioai.compress.candidates import BuildContext, Candidate, build_candidate, build_network
from efficientbioai.compress.progress import log
from efficientbioai.config import PruneConfig, QuantizeConfig
from efficientbioai.errors import EfficientBioAIError, FidelityError

AUTO_PRECISIONS = [("int8", False), ("int8", True), ("bf16", False), ("fp32", False)]
"""The precisions ``strategy: auto`` tries per network, as (precision, int8 with float fallback)."""


def plan(
    quantize: QuantizeConfig, prune: PruneConfig | None, budget: Budget | None
) -> tuple[list[float | None], list[tuple[str, bool]]]:
    """The pruning ratios (None: the original network) and the precisions to try for each of them."""
    auto = quantize.strategy == "auto"
    ratios: list[float | None] = [None]
    if prune is not None:
        # auto climbs the ladder from the smallest ratio; fixed builds the one ratio it was given
        ratios = [None, *prune.auto_ratios()] if auto else [prune.ratios[0]]
    if auto:
        precisions = list(AUTO_PRECISIONS)
    elif quantize.precision == "int8" and budget is not None:
        # plain int8 first; only when it misses the budget, int8 with the sensitive layers in float
        precisions = [("int8", False), ("int8", True)]
    else:
        precisions = [(quantize.precision, False)]
    return ratios, precisions


def search(ctx: BuildContext) -> tuple[Candidate, list[Candidate]]:
    """Build the planned candidates under ``ctx.workdir / "candidates"``; the chosen one and all of them.

    Raises :class:`FidelityError` when no candidate stays within the budget and the fidelity limits.
    """
    auto = ctx.quantize.strategy == "auto"
    ratios, precisions = plan(ctx.quantize, ctx.prune, ctx.budget)
    if ctx.budget is None:
        log(
            "warning: quantize.max_drop is null, so no accuracy budget is checked: the result is written "
            "whatever its accuracy (the measured figures are still reported)",
            False,
        )
    candidates: list[Candidate] = []
    for i, ratio in enumerate(ratios):
        missed = _previous_ratio_missed(candidates, ratios, i) if auto else None
        if missed is not None:
            # removing more channels than a ratio that already missed the budget will not recover it
            for precision, fallback in precisions:
                c = Candidate(precision, ratio, fallback)
                c.status = f"skipped: prune {missed:g} already missed the budget"
                candidates.append(c)
            continue
        network = build_network(ctx, ratio)
        log(
            "[4/5] building and checking "
            + ("candidates" if len(ratios) * len(precisions) > 1 else "the engine"),
            ctx.quiet,
        )
        for precision, fallback in precisions:
            c = Candidate(
                precision,
                ratio,
                fallback,
                parameters=network.parameters,
                steps=list(network.steps),
                onnx_path=network.onnx_path,
            )
            if fallback and _plain_int8_ok(candidates, ratio):
                c.status = "skipped: int8 already within budget"
                candidates.append(c)
                continue
            c.directory = ctx.workdir / "candidates" / c.slug
            try:
                build_candidate(c, ctx)
            except EfficientBioAIError as exc:
                if not auto and not fallback:
                    raise
                c.status = f"failed: {getattr(exc, 'problem', exc)}"
            candidates.append(c)
            _report(c, ctx.quiet)
    return choose(candidates, ctx), candidates


def _previous_ratio_missed(candidates: list[Candidate], ratios: list[float | None], i: int) -> float | None:
    """The previous pruning ratio when no candidate of it was accepted (then ``ratios[i]`` is skipped)."""
    if ratios[i] is None or i <= 1:
        return None
    previous = ratios[i - 1]
    return None if any(c.ok for c in candidates if c.prune_ratio == previous) else previous


def _plain_int8_ok(candidates: list[Candidate], ratio: float | None) -> bool:
    """Whether plain int8 of this network was accepted (then int8 with float fallback is not needed)."""
    plain = next(
        (c for c in candidates if c.prune_ratio == ratio and c.precision == "int8" and not c.fallback),
        None,
    )
    return plain is not None and plain.ok


def _report(c: Candidate, quiet: bool) -> None:
    if c.latency:
        log(
            f"      {c.name:<28} {c.latency['median_ms']:8.1f} ms/tile  Pearson r {c.fidelity['pearson']:.5f}"
            + (f"  drop {c.drop:.4g}" if c.drop is not None else "")
            + f"  {c.status}",
            quiet,
        )
    else:
        log(f"      {c.name:<28} {c.status}", quiet)


def choose(candidates: list[Candidate], ctx: BuildContext) -> Candidate:
    """The fastest accepted candidate (its status becomes "chosen"), or the over-budget error."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        raise FidelityError(
            over_budget_problem(candidates, ctx.budget), over_budget_fixes(ctx.quantize, candidates)
        )
    chosen = min(ok, key=lambda c: c.latency["median_ms"])
    chosen.status = "chosen"
    return chosen


def over_budget_problem(candidates: list[Candidate], budget: Budget | None) -> str:
    """What was measured against which limit, for every candidate that was built or failed."""
    limit = f"the accuracy budget ({budget.describe()})" if budget is not None else "the fidelity limits"
    tried = []
    for c in candidates:
        if c.status.startswith("skipped"):
            continue
        if c.problems:
            tried.append(f"{c.name}: " + "; ".join(c.problems))
        else:
            tried.append(f"{c.name}: {c.status}")
        ft = next((s for s in c.steps if s.get("step") == "fine_tune"), None)
        if ft and not c.fallback and ft.get("steps"):
            r = ft["validation_pearson_to_original"]
            tried[-1] += (
                f" (fine-tuned {ft['steps']} steps, validation r {r['before']:.4f} → {r['best']:.4f}; "
                f"{ft['stopped']})"
            )
    return f"no compressed model stays within {limit} on the held-out tiles — " + " | ".join(tried)


def over_budget_fixes(quantize: QuantizeConfig, candidates: list[Candidate]) -> str:
    """What to change when no candidate is accepted."""
    fixes = []
    if any(c.prune_ratio is not None for c in candidates):
        fixes.append(
            "fine-tune longer (prune.finetune.steps, patience) or prune less (a smaller prune.ratio)"
        )
    if quantize.strategy != "auto":
        fixes.append("let quantize.strategy: auto try other precisions (bf16, fp32, int8 with float layers)")
    if any(c.precision == "int8" for c in candidates):
        fixes.append("try quantize.preset: mixed or more calibration tiles")
    if quantize.max_drop is not None:
        fixes.append(
            "or accept the loss explicitly: a larger quantize.max_drop, or max_drop: null (no budget: "
            "the model is written whatever its accuracy)"
        )
    else:
        fixes.append("or relax the fidelity.* limits")
    return "; ".join(fixes)
