"""One epoch of training: compiled calls over a seeded batch order, with hooks between calls."""

import time

import numpy as np

from cnn_jax.predictor import ceil_div, padded_order
from cnn_jax.steps import Trainer


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of an epoch: a seeded permutation, reproducible on resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""


def train_epoch(
    trainer: Trainer, state, images, labels, order, seed, *, start=0, between_calls=None
):
    """Steps `start`.. of one pass over `order`, `trainer.steps_per_call` per compiled call.

    `between_calls(begin, end, state)` runs after each call that ran steps begin..end-1 of the
    epoch; returning True stops the epoch there. Returns (state, ms per step of each call, steps
    done in the epoch, whether stopped).
    """
    n = len(order)
    steps = ceil_div(n, trainer.batch_size)
    per_call = trainer.steps_per_call
    padded = trainer.place(padded_order(order, trainer.batch_size))
    if start == 0:
        state = state._replace(metrics=trainer.place(np.zeros(state.metrics.shape, np.float32)))
    step_ms = []
    t_last = time.perf_counter()
    i = start
    while i < steps:
        if per_call == 1:
            state = trainer.train_step(state, images, labels, padded, n, i, seed)
        else:
            state = trainer.train_steps(state, images, labels, padded, n, i, seed)
        # Waiting after each call costs little and makes the step times honest.
        state.metrics.block_until_ready()
        done = min(i + per_call, steps)
        now = time.perf_counter()
        step_ms.append((now - t_last) * 1e3 / (done - i))
        t_last, begin, i = now, i, done
        if between_calls is not None and between_calls(begin, i, state):
            return state, step_ms, i, True
    return state, step_ms, steps, False
