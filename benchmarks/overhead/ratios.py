"""The ratios of the modes' best figures, warm and cold, and their text."""

from __future__ import annotations

from benchmarks.overhead.modes import PROFILE_MODES

# The warm ratios' names and (numerator, denominator) modes.
WARM_PAIRS: dict[str, tuple[str, str]] = {
    "keras_ema_over_builtin": ("keras_ema", "builtin"),
    "keras_ema_over_none": ("keras_ema", "none"),
    "builtin_over_none": ("builtin", "none"),
    "every10_over_none": ("keras_ema_every10", "none"),
    "offload_over_keras_ema": ("keras_ema_offload", "keras_ema"),
    "offload_over_none": ("keras_ema_offload", "none"),
    "offload_every10_over_none": ("keras_ema_offload_every10", "none"),
    "noguard_over_keras_ema": ("keras_ema_noguard", "keras_ema"),
    "noguard_over_builtin": ("keras_ema_noguard", "builtin"),
    "posthoc_over_2profiles": ("keras_ema_posthoc", "keras_ema_2profiles"),
    "posthoc_over_builtin": ("keras_ema_posthoc", "builtin"),
    "teacher_over_handwritten": ("keras_ema_teacher", "handwritten_teacher"),
}
# The cold ratios besides each keras_ema mode over builtin and none.
COLD_PAIRS = {k: WARM_PAIRS[k] for k in ("teacher_over_handwritten",)}


def warm_ratios(best: dict[str, float]) -> dict[str, float | None]:
    """The overhead ratios computable from the modes that were run."""
    ratios = {
        k: best[a] / best[b]
        for k, (a, b) in WARM_PAIRS.items()
        if a in best and b in best
    }
    return ratios | profile_ratios(best)


def profile_ratios(best: dict[str, float]) -> dict[str, float | None]:
    """The profiles modes over ``builtin``, and what K profiles add.

    ``{K}profiles_marginal`` is ``(kprofiles - none) / (K * (keras_ema - none))``:
    1 when each profile costs what the one of ``keras_ema`` does, less when
    the profiles share work (they read the weights once). ``None`` when
    ``keras_ema`` was not slower than ``none``.
    """
    ratios: dict[str, float | None] = {}
    for mode, k in PROFILE_MODES.items():
        if mode not in best:
            continue
        if "builtin" in best:
            ratios[f"{k}profiles_over_builtin"] = best[mode] / best["builtin"]
        if "none" in best and "keras_ema" in best:
            one = best["keras_ema"] - best["none"]
            added = best[mode] - best["none"]
            ratios[f"{k}profiles_marginal"] = added / (k * one) if one > 0 else None
    return ratios


def cold_ratios(best: dict[str, float]) -> dict[str, float | None]:
    """Each keras_ema mode over ``builtin`` and over ``none``, the
    ``COLD_PAIRS`` and the profiles' marginal costs (`profile_ratios`)."""
    ratios: dict[str, float | None] = {
        k: best[a] / best[b]
        for k, (a, b) in COLD_PAIRS.items()
        if a in best and b in best
    }
    for mode in best:
        if mode.startswith("keras_ema"):
            for base in ("builtin", "none"):
                if base in best:
                    ratios[f"{mode}_over_{base}"] = best[mode] / best[base]
    marginal = profile_ratios(best).items()
    return ratios | {k: v for k, v in marginal if k.endswith("_marginal")}


def format_ratios(ratios: dict[str, float | None]) -> str:
    """``name value, ...``; ``n/a`` for a ratio that could not be computed."""
    return ", ".join(
        f"{k} {'n/a' if v is None else format(v, '.4f')}" for k, v in ratios.items()
    )
