"""Using a trained checkpoint: restore it for inference, evaluate a folder, classify files."""

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from cnn_jax import data as data_lib
from cnn_jax.checkpoint import CheckpointError, locate
from cnn_jax.config import Config
from cnn_jax.data import load_configured, split_run
from cnn_jax.data.signs import sign_name
from cnn_jax.errors import UserError
from cnn_jax.models import count_params
from cnn_jax.predictor import EVAL_BATCH, Predictor, evaluate, probability_losses
from cnn_jax.run_meta import RunMeta
from cnn_jax.run_store import data_fingerprint
from cnn_jax.steps import abstract_state


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint ready for inference: the network and its parameters, no optimizer."""

    config: Config
    predictor: Predictor
    params: Any  # the weights (parameters and batch statistics), on the predictor's devices
    meta: RunMeta
    step: int
    directory: Path

    def param_count(self) -> int:
        # Per network: an ensemble's members are counted once.
        return count_params(nnx.merge(self.predictor.graphdef, self.params)) // self.config.ensemble


# Test-time views beyond this gain nothing measurable and multiply the time.
MAX_TTA = 32


def load_checkpoint(path: Path | str, platform: str | None = None, tta: int = 1) -> Restored:
    """A run folder (its best checkpoint), its checkpoints/ folder, or one step's folder, on
    `platform`'s devices (JAX's default backend's when None); `tta` views averaged per image
    (augment.views)."""
    if not 1 <= tta <= MAX_TTA:
        raise UserError(f"--tta must be between 1 and {MAX_TTA}, not {tta}")
    store, step = locate(path)
    meta = store.read_meta(step)
    try:
        config = meta.run_config()
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint step {step} in {store.directory}: its config: {e}"
        ) from None
    # Restored onto this machine's devices, whatever the run trained on (a GPU, 8 devices).
    local = dataclasses.replace(config, platform=platform, devices=None)
    predictor, template = abstract_state(local, meta.num_classes)
    predictor = dataclasses.replace(predictor, tta=tta)
    state, meta = store.restore(step, template)
    store.close()
    params = predictor.place(state.weights)  # the optimizer's arrays are dropped here
    return Restored(config, predictor, params, meta, step, store.directory / str(step))


def features(restored: Restored, images: np.ndarray) -> np.ndarray:
    """What the network's last layer reads for uint8 images, dropout off: (images, features).
    One network's: an ensemble's members each read their own."""
    if restored.predictor.members:
        raise UserError(f"{restored.directory} is an ensemble: features are one network's")
    model = nnx.merge(restored.predictor.graphdef, restored.params)
    model.logits = _LastInput()  # every model ends in logits(dropout(x))
    graphdef, state = nnx.split(model)
    pixels = restored.predictor.pixels
    read = jax.jit(lambda w, x: nnx.merge(graphdef, w)(data_lib.scale_pixels(x, pixels)))
    return in_batches(lambda batch: read(state, batch), images, EVAL_BATCH)


class _LastInput(nnx.Module):
    """Stands in for a network's last layer, and hands on what that layer would have read."""

    def __call__(self, x):
        return x


class Tested(NamedTuple):
    """A checkpoint's softmax outputs on a set of images."""

    images: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray  # (images, classes); an ensemble's mean
    source: str  # what the images are, in words
    checkpoint: str
    paths: np.ndarray  # the images' files, relative to the data folder


def evaluation_data(restored: Restored, data_dir, layout, cache_dir):
    """(dataset, indices, words): every image of `data_dir`, or the run's own test split."""
    cfg = restored.config
    if data_dir is None and restored.meta.imported_from:
        raise UserError(
            f"{restored.directory} was imported from {restored.meta.imported_from} and has no "
            "data of its own: give a data folder to evaluate on"
        )
    if data_dir is None:
        ds = load_configured(cfg, cache_dir)
        # Another set of files would give another "own test split", silently mixing in training
        # images: refused as a resume refuses it.
        if restored.meta.data_fingerprint not in (None, data_fingerprint(ds)):
            raise UserError(
                f"the run's data ({cfg.data or 'synthetic signs'}) has changed since "
                f"{restored.directory} was trained (other files or labels), so its test split "
                "cannot be rebuilt: give a data folder to evaluate on"
            )
        _, _, idx = split_run(cfg, ds)
        source = f"the test split of {cfg.data or 'the synthetic signs'}"
    else:
        ds = data_lib.load_folder(
            data_dir, layout=layout, image_size=cfg.image_size, cache_dir=cache_dir,
            decoder=cfg.decoder,
        )  # fmt: skip
        idx = np.arange(len(ds.labels))
        source = str(Path(data_dir).resolve())
    if ds.num_classes > restored.meta.num_classes:
        raise UserError(
            f"the data has class ids up to {ds.num_classes - 1}; the model knows "
            f"{restored.meta.num_classes} classes"
        )
    return ds, idx, source


def in_batches(run, images: np.ndarray, batch: int) -> np.ndarray:
    """`run` over every image in batches of `batch`, the last padded with black images (one
    shape for a compiled function or a static-batch runtime), the padding's rows dropped."""
    padded = np.concatenate(
        [images, np.zeros((-len(images) % batch, *images.shape[1:]), images.dtype)]
    )
    outputs = [np.asarray(run(padded[i : i + batch])) for i in range(0, len(padded), batch)]
    return np.concatenate(outputs)[: len(images)]


def probabilities(restored: Restored, images: np.ndarray) -> np.ndarray:
    """The checkpoint's softmax outputs for uint8 images, in padded batches."""
    run = lambda batch: restored.predictor.probabilities(restored.params, batch)  # noqa: E731
    return in_batches(run, images, EVAL_BATCH)


def probabilities_on(restored: Restored, data_dir=None, layout="auto", cache_dir=None) -> Tested:
    """The checkpoint's probabilities for every image of `data_dir`, or its run's test split."""
    ds, idx, source = evaluation_data(restored, data_dir, layout, cache_dir)
    images = ds.images[idx]
    return Tested(images, ds.labels[idx], probabilities(restored, images), source,
                  str(restored.directory), ds.paths[idx])  # fmt: skip


def evaluate_checkpoint(
    restored: Restored, data_dir=None, layout="auto", cache_dir=None
) -> dict[str, Any]:
    """Every image of `data_dir`, or without one the run's own test split, evaluated."""
    ds, idx, source = evaluation_data(restored, data_dir, layout, cache_dir)
    ev = evaluate(restored.predictor, restored.params, ds.images[idx], ds.labels[idx])
    predictions = ev.pop("predictions")
    return {
        **_header(restored, ds, source),
        **ev,
        "per_class": _per_class(ds.labels[idx], predictions),
    }


def _header(restored: Restored, ds, source: str) -> dict[str, Any]:
    return {
        "checkpoint": str(restored.directory),
        "data": source,
        "skipped_files": [{"path": p, "reason": r} for p, r in ds.skipped],
    }


def _per_class(labels: np.ndarray, predictions: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"class": int(c), "name": sign_name(int(c)), "n": int(np.sum(labels == c)),
         "accuracy": float(np.mean(predictions[labels == c] == c))}
        for c in np.unique(labels)
    ]  # fmt: skip


def evaluate_committee(
    restored: list[Restored], data_dir=None, layout="auto", cache_dir=None
) -> dict[str, Any]:
    """Runs trained apart, each at its own image size and pixel scaling, evaluated as one
    network by their mean probabilities: on every image of `data_dir`, or on their runs' test
    split, which must then be one split (a seed, --split or --test-size of its own would put
    another run's training images in it). Checked before any network runs."""
    _check_committee(restored, own_split=data_dir is None)
    loaded = [evaluation_data(r, data_dir, layout, cache_dir) for r in restored]
    ds, idx, source = loaded[0]
    for r, (other, other_idx, _) in zip(restored[1:], loaded[1:]):
        if not (
            np.array_equal(other.paths[other_idx], ds.paths[idx])
            and np.array_equal(other.labels[other_idx], ds.labels[idx])
        ):
            raise UserError(f"{r.directory} and {restored[0].directory} {_apart(data_dir)}")
    each = [probabilities(r, d.images[i]) for r, (d, i, _) in zip(restored, loaded)]
    probs, labels = np.mean(each, axis=0), ds.labels[idx]
    predictions = np.argmax(probs, axis=-1)
    right = [p.argmax(-1) == labels for p in each]  # each run alone
    return {
        **_header(restored[0], ds, source),
        "committee": [str(r.directory) for r in restored],
        "loss": float(np.mean(probability_losses(probs, labels))),
        "accuracy": float(np.mean(predictions == labels)),
        "n": len(labels),
        "committee_accuracy": [float(np.mean(r)) for r in right],
        # Images no run reads: averaging rarely rescues them, so their count caps what the
        # committee can reach (BENCHMARKS.md).
        "wrong_in_every_run": int(np.sum(~np.any(right, axis=0))),
        "per_class": _per_class(labels, predictions),
    }


def _check_committee(restored: list[Restored], own_split: bool) -> None:
    """What makes a committee meaningless, known from the runs' settings alone; `own_split`
    when it is judged on its runs' test split (not on a data folder or photos)."""
    first = restored[0]
    if len({r.directory.resolve() for r in restored}) < len(restored):
        raise UserError("a run is in the committee twice: each run counts once")
    for r in restored[1:]:
        if r.meta.num_classes != first.meta.num_classes:
            raise UserError(
                f"{r.directory} knows {r.meta.num_classes} classes and {first.directory} "
                f"{first.meta.num_classes}: a committee's runs must know the same classes"
            )
    # Imported runs have no data of their own either; evaluation_data says so.
    synthetic = {
        (r.config.image_size, r.config.synthetic_per_class, r.config.num_classes or 43)
        for r in restored
        if r.config.data is None and not r.meta.imported_from
    }
    if own_split and len(synthetic) > 1:
        raise UserError(
            "the synthetic signs are drawn anew for each image size and count, so these runs "
            "were not tested on the same images: give a data folder to evaluate on"
        )


def _apart(data_dir) -> str:
    if data_dir is None:
        return (
            "were tested on other images (their runs split the data apart: another seed, "
            "--split or --test-size, or other data): a committee is judged on images none of "
            "its runs trained on"
        )
    return f"read other images from {data_dir} (another --decoder skips other files)"


def predict_files(restored: Restored, paths: list[str], top_k: int = 3, others=()):
    """For each path, (path, [(class, name, probability), ...] or an error string, and the top
    (class, name, probability) of each part: each run when `others` make a committee with
    `restored` (their mean probabilities rank the classes), each member of an ensemble, else
    None)."""
    if top_k < 1:
        raise UserError("--top-k must be at least 1")
    runs = [restored, *others]
    if others:
        _check_committee(runs, own_split=False)
    results, images, ok = [], [[] for _ in runs], []
    for p in paths:
        try:
            decoded = [
                data_lib.decode_image(p, r.config.image_size, r.config.decoder) for r in runs
            ]
        except data_lib.UNREADABLE as e:
            results.append((p, f"cannot read {p}: {data_lib.describe_error(e, p)}", None))
            continue
        for bucket, image in zip(images, decoded):
            bucket.append(image)
        ok.append(len(results))
        results.append((p, None, None))
    if ok:
        probs, parts = _predicted(runs, [np.stack(x) for x in images])
        for n, (row, i) in enumerate(zip(probs, ok)):
            top = np.argsort(-row, kind="stable")[:top_k]
            each = None
            if parts is not None:
                best = np.argmax(parts[:, n], axis=-1)
                each = [(int(c), sign_name(int(c)), float(parts[m, n, c]))
                        for m, c in enumerate(best)]  # fmt: skip
            results[i] = (
                paths[i], [(int(c), sign_name(int(c)), float(row[c])) for c in top], each
            )  # fmt: skip
    return results


def _predicted(runs: list[Restored], batches: list[np.ndarray]):
    """The runs' mean probabilities for their batches of the same images, and the parts to
    list beside them: each run of a committee, each member of one run's ensemble, or None."""
    each = []
    for r, batch in zip(runs, batches):
        probs = np.asarray(r.predictor.probabilities(r.params, batch))
        if not np.isfinite(probs).all():
            raise UserError(
                f"the network in {r.directory} outputs non-numbers (NaN or infinite): "
                "its weights are broken; train or import it again"
            )
        each.append(probs)
    if len(runs) > 1:
        return np.mean(each, axis=0), np.stack(each)
    one = runs[0]
    if one.predictor.members:
        return each[0], np.asarray(one.predictor.member_probabilities(one.params, batches[0]))
    return each[0], None
