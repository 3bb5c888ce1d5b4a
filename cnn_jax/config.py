"""The run configuration: one frozen dataclass, written as JSON into every run folder."""

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides a training run's result."""

    model: int = 2  # 1: one conv block, 2: two conv blocks (the tutorial's two networks)
    data: str | None = None  # data folder; None trains on the built-in synthetic signs
    layout: str = "auto"  # auto, cs50, gtsrb-train or gtsrb-test
    image_size: int = 30  # images are resized to image_size x image_size (tutorial: 30)
    num_classes: int | None = None  # None: taken from the data (43 for GTSRB)
    pixels: str = "unit"  # unit: x / 255; raw: 0..255 as the tutorial feeds Keras
    test_size: float = 0.4  # fraction held out for testing (tutorial: TEST_SIZE = 0.4)
    split: str = "random"  # random (the tutorial's) or track (no near-duplicates across sides)
    epochs: int = 10  # tutorial: EPOCHS = 10
    batch_size: int = 32  # Keras' fit default, which the tutorial keeps
    learning_rate: float = 1e-3  # Keras' Adam default
    optimizer: str = "keras-adam"  # keras-adam (Keras' formula) or adam (optax's)
    dropout: float = 0.5  # the tutorial's Dropout(0.5); 0 switches it off (parity tests)
    conv: str = "auto"  # auto (matmul on CPU, lax elsewhere), lax or matmul: same values
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    # float32 matmul/conv precision: default (TF32 on recent NVIDIA GPUs), high or highest
    precision: str = "default"
    platform: str | None = None  # cpu, gpu or tpu; None: JAX's default backend
    devices: int | None = None  # data-parallel over this many local devices; None: all
    # training steps per compiled call: auto is 1 on CPU, up to an epoch on accelerators
    steps_per_call: int | str = "auto"
    # XLA's deterministic GPU ops; only takes effect if set before JAX starts (the CLI does)
    deterministic: bool = True
    seed: int = 0  # drives the split, the initial weights, the batch order and dropout
    eval_every_epoch: bool = False  # also evaluate on the test split after every epoch
    synthetic_per_class: int = 100  # images per class when no data folder is given

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def quick() -> Config:
    """A preset that trains in seconds, for smoke tests and first looks."""
    return Config(epochs=2, synthetic_per_class=20)
