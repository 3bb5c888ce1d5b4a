"""`model.fit` on the very arrays and split that cnn_jax.data produces."""

import statistics
import time

import keras
import numpy as np

from cnn_jax import data as data_lib
from cnn_jax.config import Config
from keras_ref.models import compile_model, create_model


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch, in ms."""

    def on_train_begin(self, logs=None):
        self.ms = []
        self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.ms.append((now - self._last) * 1e3)
        self._last = now

    def on_epoch_begin(self, epoch, logs=None):
        self._last = time.perf_counter()


def fit(config: Config, dataset: data_lib.Dataset, verbose: int = 0) -> tuple[keras.Model, dict]:
    """Trains the Keras model as the tutorial does; returns it and cnn_jax-shaped metrics."""
    keras.utils.set_random_seed(config.seed)
    num_classes = config.num_classes or dataset.num_classes
    train_idx, test_idx = data_lib.split_indices(
        dataset.labels, config.test_size, config.seed, config.split, dataset.paths
    )
    x = data_lib.scale_pixels(dataset.images, config.pixels)
    y = keras.utils.to_categorical(dataset.labels, num_classes)
    net = create_model(config.model, config.image_size, num_classes)
    compile_model(net, config.learning_rate)
    timer = StepTimer()
    t0 = time.perf_counter()
    history = net.fit(
        x[train_idx],
        y[train_idx],
        batch_size=config.batch_size,
        epochs=config.epochs,
        verbose=verbose,
        callbacks=[timer],
    )
    train_seconds = time.perf_counter() - t0
    loss, accuracy = net.evaluate(x[test_idx], y[test_idx], verbose=0)
    steps = -(-len(train_idx) // config.batch_size)
    return net, {
        "model": config.model,
        "params": int(net.count_params()),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "epochs": [
            {"train_loss": float(a), "train_accuracy": float(b)}
            for a, b in zip(history.history["loss"], history.history["accuracy"])
        ],
        "test_loss": float(loss),
        "test_accuracy": float(accuracy),
        # the first step of the run compiles; leave it out as cnn_jax does
        "median_step_ms": statistics.median(timer.ms[1:]) if len(timer.ms) > 1 else None,
        "train_seconds": train_seconds,
        "steps_per_epoch": steps,
    }


def predict_classes(net: keras.Model, images: np.ndarray, pixels: str) -> np.ndarray:
    probs = net.predict(data_lib.scale_pixels(images, pixels), batch_size=1000, verbose=0)
    return probs.argmax(-1)


def main() -> None:
    """`python -m keras_ref.train DATA --model 2`: the tutorial's run, in Keras, on our split."""
    import argparse

    from cnn_jax.report import test_line

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("data")
    p.add_argument("--model", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", choices=data_lib.PIXELS, default="unit")
    p.add_argument("--split", choices=data_lib.SPLITS, default="random")
    args = p.parse_args()
    t0 = time.perf_counter()
    ds = data_lib.load_folder(args.data)
    cfg = Config(
        model=args.model, epochs=args.epochs, seed=args.seed, pixels=args.pixels, split=args.split
    )
    _, m = fit(cfg, ds, verbose=2)
    print(f"median {m['median_step_ms']:.2f} ms/step; {time.perf_counter() - t0:.1f}s in all")
    print(test_line(m["test_loss"], m["test_accuracy"]))


if __name__ == "__main__":
    main()
