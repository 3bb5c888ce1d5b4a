"""What a checkpoint says of its run besides the arrays: one dataclass, written as JSON beside
them, built here for training and for `import-keras`, and checked field by field on every read."""

import dataclasses
import json
from typing import Any

from cnn_jax.config import Config, saved_settings


@dataclasses.dataclass(frozen=True)
class RunMeta:
    config: dict  # the run's Config as saved (config.saved_settings reads older ones)
    num_classes: int
    epoch: int  # epochs finished
    step_in_epoch: int  # steps done in the next epoch
    epochs: list  # one record per finished epoch: {figure name: number}
    data_fingerprint: str | None = None  # run_store.data_fingerprint; None when imported
    imported_from: str | None = None  # the Keras file an imported model came from
    # Filled in by Checkpoints.save:
    step: int | None = None
    val_accuracy: float | None = None
    params_sha256: str | None = None
    state_sha256: str | None = None

    @classmethod
    def for_run(cls, config: Config, num_classes: int, epoch: int, step_in_epoch: int,
                epochs: list, **extra) -> "RunMeta":  # fmt: skip
        return cls(dataclasses.asdict(config), num_classes, epoch, step_in_epoch, epochs, **extra)

    def run_config(self) -> Config:
        """The saved config as this version's Config (fields it no longer has are dropped)."""
        fields = {f.name for f in dataclasses.fields(Config)}
        return Config(**{k: v for k, v in saved_settings(self.config).items() if k in fields})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value) -> "RunMeta":
        """Raises ValueError naming the first field of the wrong shape."""
        problem = _problem(value)
        if problem:
            raise ValueError(problem)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


# The fields every reader relies on, and their JSON types (bool is not an int here).
_REQUIRED = {"config": dict, "num_classes": int, "epoch": int, "step_in_epoch": int, "epochs": list}
_OPTIONAL = {
    "data_fingerprint": str,
    "imported_from": str,
    "step": int,
    "params_sha256": str,
    "state_sha256": str,
    "val_accuracy": (int, float),
    "test_accuracy": (int, float),
}  # fmt: skip (test_accuracy: written by old versions)


def _problem(meta) -> str | None:
    if not isinstance(meta, dict):
        return "meta is not a JSON object"
    for key, kind in _REQUIRED.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"meta field {key!r} is {json.dumps(value)[:40]}, expected a {kind.__name__}"
    for key, kind in _OPTIONAL.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"meta field {key!r} is {json.dumps(value)[:40]}, expected a number or text"
    if meta["num_classes"] < 1 or meta["epoch"] < 0 or meta["step_in_epoch"] < 0:
        return "meta has a negative position or no classes"
    for record in meta["epochs"]:
        numbers = isinstance(record, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in record.values()
        )
        if not numbers:
            return "meta field 'epochs' holds a record that is not numbers by name"
    return None
