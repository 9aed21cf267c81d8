"""Sizes that choose between equivalent ways of running the update.

None of them changes a value; each picks the faster of two forms of the same
arithmetic, as measured with `benchmarks/overhead/` on CPU (the figures
are in `docs/performance.md`).
"""

# Weights of up to this many elements are checked for NaN/Inf in groups, and
# on JAX and TensorFlow their shadows travel through `fit` packed into flat
# arrays of up to this size. XLA on CPU splits larger kernels over threads,
# which cost more than they saved on a few cores.
GROUP_ELEMENTS = 1 << 15

# TensorFlow without XLA: where the shadows average at least this many
# elements, copy, average or keep is chosen with `cond` on scalar flags (a
# fixed cost per tensor) rather than with elementwise selects (a pass over
# memory per tensor).
BRANCH_MEAN_ELEMENTS = 1 << 16

# torch on CPU: from this many tracked elements on, each shadow is blended in
# place from its own weight rather than from one flat copy of all weights.
IN_PLACE_ELEMENTS = 1 << 20
