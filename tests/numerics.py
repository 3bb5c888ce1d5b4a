"""What float32 can promise when the same sums are taken in another order: the bounds that the
suite's tolerances are set from, instead of from what one machine happened to print.

One reduction: a dot product of n terms computed in float32 lies within γₙ·Σ|xᵢyᵢ| of the
exact value, γₙ = n·u/(1 - n·u), u = eps/2 (Higham, Accuracy and Stability of Numerical
Algorithms, 2002, §3.1), in any order; two orders (another formulation, another device count,
another batch size for XLA's kernels) are within n·eps·Σ|xᵢyᵢ| of each other (`bound`). For a
single layer that bound is tight enough to catch a weight 1e-4 off.

Through a whole network the same analysis multiplies by |W| at every layer and ends orders of
magnitude above the outputs themselves: a test with it would pass anything. There the test is
whether two computations are the same function (`assert_same_function`): a wiring mistake
(another padding, a transposed kernel, a gradient routed to another element) moves outputs by
their own size (root mean square), while rounding, bounded layer by layer by the single-layer
tests, moves them by about eps times a modest growth per layer. A tolerance of 1e-3 of that
size sits three orders of magnitude from either.
"""

import numpy as np

EPS = float(np.finfo(np.float32).eps)
SAME_FUNCTION = 1e-3  # of the outputs' size: see above


def bound(terms: int, scale) -> np.ndarray:
    """How far two evaluations of sums of `terms` products may differ, for Σ|xᵢyᵢ| = `scale`."""
    return terms * EPS * np.asarray(scale, np.float64)


def assert_within(a, b, limit, what: str = "") -> None:
    """|a - b| <= limit entry by entry (limit broadcasts), with the worst entry in the message."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    limit = np.broadcast_to(np.asarray(limit, np.float64), diff.shape)
    worst = np.unravel_index(np.argmax(diff - limit), diff.shape) if diff.ndim else ()
    assert (diff <= limit).all(), f"{what}: |difference| {diff[worst]:.3g} > {limit[worst]:.3g}"


def relative(a, b, scale=None) -> float:
    """Normwise |a - b| / |scale| (|b| without one): where rounding moves a few entries a lot
    (Adam's near-zero gradients), the norm of the difference stays a small part of the whole."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b if scale is None else scale))


def assert_same_function(a, b, what: str = "") -> None:
    """a and b: one function of the same inputs, computed two ways through many layers."""
    size = float(np.sqrt(np.mean(np.square(np.asarray(b, np.float64)))))
    assert size > 0, f"{what}: zeros tell nothing"
    assert_within(a, b, SAME_FUNCTION * size, what)
