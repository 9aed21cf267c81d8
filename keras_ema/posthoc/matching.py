"""Pairing the variables of post-hoc EMA snapshots with a Keras model's, for
`PostHocRun.synthesize_into`."""

from __future__ import annotations

from keras_ema.posthoc.encoding import dtype_name
from keras_ema.weight_paths import same_weight


def match_variables(variables: list, model, directory: str) -> list:
    """Pairs each snapshot variable (`variables`: the header's specs) with
    the model's variable of the same path, up to a leading model name;
    raises, naming the variable, on any mismatch.

    Returns:
        `(path, variable)` pairs, in the order of `variables`.
    """
    weights = list(model.weights)
    pairs, used = [], set()
    for spec in variables:
        path = spec["path"]
        exact = [v for v in weights if v.path == path]
        found = exact or [v for v in weights if same_weight(path, v.path)]
        if len(found) != 1:
            problem = "no variable" if not found else "several variables"
            raise ValueError(
                f"`model` does not fit the snapshots in {directory!r}: it "
                f"has {problem} matching {path!r}."
            )
        (variable,) = found
        if id(variable) in used:
            raise ValueError(
                f"`model` does not fit the snapshots in {directory!r}: "
                f"its variable {variable.path!r} matches several snapshot "
                "variables."
            )
        used.add(id(variable))
        if tuple(variable.shape) != tuple(spec["shape"]):
            raise ValueError(
                f"`model` does not fit the snapshots in {directory!r}: "
                f"variable {variable.path!r} has shape {tuple(variable.shape)} "
                f"but the snapshots hold {tuple(spec['shape'])}."
            )
        pairs.append((path, variable))
    missing = [
        v.path for v in weights if id(v) not in used and "float" in dtype_name(v.dtype)
    ]
    if missing:
        raise ValueError(
            f"`model` does not fit the snapshots in {directory!r}: its "
            f"variables {missing[:10]} are not in the snapshots."
        )
    return pairs
