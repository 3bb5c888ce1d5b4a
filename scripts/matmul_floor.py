"""How long XLA takes for the matrix products alone of one training step, on this machine.

    python scripts/matmul_floor.py            # Models 1 and 2, batch 32

A training step of the matmul formulation (cnn_jax/ops.py) is these products plus the
element-wise work around them (im2col, pooling, ReLU, Adam). Timing the products alone, each
compiled on its own and all in one compiled call, bounds from below what any arrangement of the
rest can reach with XLA's matrix kernels; BENCHMARKS.md compares it with the whole step.
"""

import argparse
import time

import jax


def products(model: int, batch: int = 32, size: int = 30, classes: int = 43):
    """(name, lhs shape, rhs shape, which operand is used transposed) of one step's products.

    Forward: im2col @ kernel. Backward: the kernel gradient im2col^T @ grad, and the input
    gradient grad @ kernel^T, which the first convolution does not need (its input is data).
    """
    p1 = batch * (size - 2) ** 2  # conv1 output pixels
    side = (size - 2) // 2
    rows = [("conv1", p1, 27, 32, False)]
    if model == 2:
        p2 = batch * (side - 2) ** 2
        rows.append(("conv2", p2, 9 * 32, 64, True))
        side = (side - 2) // 2
        flat = side * side * 64
    else:
        flat = side * side * 32
    rows += [("dense1", batch, flat, 128, True), ("logits", batch, 128, classes, True)]
    out = []
    for name, m, k, n, needs_dx in rows:
        out.append((f"{name} forward", (m, k), (k, n), None))
        out.append((f"{name} kernel grad", (m, k), (m, n), "lhs"))
        if needs_dx:
            out.append((f"{name} input grad", (m, n), (k, n), "rhs"))
    return out


def _product(transposed):
    if transposed == "lhs":
        return lambda a, b: a.T @ b
    if transposed == "rhs":
        return lambda a, b: a @ b.T
    return lambda a, b: a @ b


def time_ms(f, args, calls: int, rounds: int = 5) -> float:
    """Best of `rounds` mean times over `calls` back-to-back calls, waited for at the end."""
    out = f(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    keys = iter(jax.random.split(jax.random.key(0), 64))
    for model in args.models:
        rows = products(model, args.batch)
        operands, fns, total_flop, total_ms = [], [], 0, 0.0
        for name, lhs, rhs, transposed in rows:
            a = jax.random.normal(next(keys), lhs)
            b = jax.random.normal(next(keys), rhs)
            fn = _product(transposed)
            ms = time_ms(jax.jit(fn), (a, b), args.calls)
            m, k = (lhs[1], lhs[0]) if transposed == "lhs" else lhs
            n = rhs[0] if transposed == "rhs" else rhs[1]
            flop = 2 * m * k * n
            total_flop, total_ms = total_flop + flop, total_ms + ms
            operands += [a, b]
            fns.append(fn)
            print(
                f"model {model}  {name:20s} {m:6d} x {k:5d} x {n:4d}  {ms:6.3f} ms  "
                f"{flop / ms / 1e6:6.1f} GFLOP/s"
            )

        def together(*ops, fns=fns):
            return [f(a, b) for f, a, b in zip(fns, ops[::2], ops[1::2], strict=True)]

        ms = time_ms(jax.jit(together), operands, args.calls)
        print(
            f"model {model}  {len(rows)} products: {total_flop / 1e6:.0f} MFLOP, "
            f"{total_ms:.2f} ms one by one, {ms:.2f} ms in one call "
            f"({total_flop / ms / 1e6:.0f} GFLOP/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
