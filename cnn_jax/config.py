"""The run configuration: one frozen dataclass, written as JSON into every run folder.

Each field carries its command-line help, its choices or range, and whether a resumed run must
keep it; `cnn-jax train` builds its options from them and `__post_init__` checks them, so a
setting is declared once. The choice lists live here, and the modules that use them import
them from here.
"""

import dataclasses
import json
import math
import typing
from pathlib import Path

from cnn_jax.errors import UserError
from cnn_jax.files import write_whole

LAYOUTS = ("auto", "cs50", "gtsrb-train", "gtsrb-test")
PIXELS = ("unit", "raw", "standard", "equalize", "grey", "local")
DECODERS = ("opencv", "pillow")
SPLITS = ("random", "track")
OPTIMIZERS = ("keras-adam", "adam")
SCHEDULES = ("constant", "cosine")
RECIPES = ("strong",)
CONVS = ("auto", "lax", "matmul", "onednn")
DTYPES = ("float32", "bfloat16")
PRECISIONS = ("default", "high", "highest")
PLATFORMS = ("cpu", "gpu", "tpu")
# Seeds go to NumPy's generator and to jax.random.key, which takes a 32-bit integer here.
MAX_SEED = 2**31 - 1
# The smallest input side that leaves each model's last block at least one pixel.
MIN_IMAGE_SIZE = {1: 4, 2: 10, 3: 8}
MAX_IMAGE_SIZE = 1024
SMALLEST_IMAGE_SIZE = min(MIN_IMAGE_SIZE.values())  # what some model takes
# A strength's option is --aug-<name>; runs saved before `strengths` had aug_<name> fields.
STRENGTH_PREFIX = "aug_"


def strength_flag(name: str) -> str:
    return "--" + (STRENGTH_PREFIX + name).replace("_", "-")


def setting(default, help, *, choices=None, low=None, high=None, above=None, below=None,
            resume=False, flag=None):  # fmt: skip
    """A Config field: `help` for --help; `choices`, or bounds: low/high inclusive,
    above/below exclusive; `resume` when a resumed run must keep it; `flag` when the option is
    not --field-name ('' for the positional data argument)."""
    meta = dict(help=help, choices=choices, low=low, high=high, above=above, below=below,
                resume=resume, flag=flag)  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def kind(field: dataclasses.Field) -> type:
    """The field's value type: int for `int | None` and for steps_per_call's `int | str`."""
    args = typing.get_args(field.type) or (field.type,)
    return next(t for t in args if t is not type(None))


def _check(field: dataclasses.Field, value, name: str | None = None) -> None:
    meta, name, want = field.metadata, name or flag(field.name), kind(field)
    if isinstance(field.default, tuple):  # an option given once or more: each a text
        if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            raise UserError(f"each {name} must be a non-empty text, not {value!r}")
        return
    if want is Strengths:  # checked by its own __post_init__
        if not isinstance(value, Strengths):
            raise UserError(f"the augmentation strengths must be a dict, not {value!r}")
        return
    if value is None and field.default is None or value == field.default == "auto":
        return
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            options = ", ".join(map(str, meta["choices"]))
            raise UserError(f"{name} must be one of {options}, not {value!r}")
    elif want is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, not {value!r}")
    elif want is str:
        if not isinstance(value, str) or not value:
            raise UserError(f"{name} must be a non-empty text, not {value!r}")
    else:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or (want is int and value != int(value)):
            what = "a whole number" if want is int else "a finite number"
            raise UserError(f"{name} must be {what}, not {value!r}")
        for bound, fails, words in (
            ("low", lambda b: value < b, "at least"),
            ("high", lambda b: value > b, "at most"),
            ("above", lambda b: value <= b, "above"),
            ("below", lambda b: value >= b, "below"),
        ):
            if meta[bound] is not None and fails(meta[bound]):
                raise UserError(f"{name} must be {words} {meta[bound]}, not {value!r}")


@dataclasses.dataclass(frozen=True)
class Strengths:
    """How far --augment goes: the largest change of each kind (each field's help says how an
    image draws it). One value in Config; `--aug-<name>` on the command line."""

    rotate: float = setting(15.0, "largest rotation, degrees", low=0, high=180)
    scale: float = setting(0.1, "largest scaling, fraction of the size", low=0, below=1)
    shear: float = setting(0.1, "largest shear factor (tan of its angle)", low=0, high=1)
    shift: float = setting(0.1, "largest shift, fraction of the side", low=0, high=0.5)
    brightness: float = setting(
        0.2, "largest brightness change, fraction of full scale, added", low=0, high=1
    )
    contrast: float = setting(
        0.2, "largest contrast change: the spread about the mean times 1 ± it", low=0, below=1
    )
    blur: float = setting(
        0.0, "largest Gaussian blur, its sigma in pixels (0: none)", low=0, high=2
    )
    noise: float = setting(
        0.0,
        "largest Gaussian pixel noise, its spread as a fraction of full scale (0: none)",
        low=0,
        high=0.5,
    )
    gamma: float = setting(
        0.0,
        "largest gamma change: pixels (as 0..1) raised to a power from 1/(1 + it) to 1 + it "
        "(0: none)",
        low=0,
        high=3,
    )
    erase: float = setting(
        0.0,
        "largest erased rectangle (cutout): its height and width each up to this fraction "
        "of the side, painted in the image's mean colour (0: none)",
        low=0,
        high=1,
    )
    colour: float = setting(
        0.0,
        "largest colour cast: each channel times its own factor from 1 - it to 1 + it, as "
        "another light or camera gives (0: none)",
        low=0,
        below=1,
    )
    aspect: float = setting(
        0.0,
        "largest change of aspect: the width times a factor from 1 - it to 1 + it, the height "
        "kept, as a condensed or a wide font gives (0: none)",
        low=0,
        below=1,
    )
    flip: float = setting(
        0.0,
        "chance that a training image of a GTSRB sign whose mirror image is a sign (yield, a "
        "curve left, the 30 km/h limit up-down) is mirrored and takes the mirror's class "
        "(0: none; GTSRB's 43 classes only)",
        low=0,
        high=1,
    )
    elastic: float = setting(
        0.0,
        "largest elastic distortion: every pixel moved by a smooth random field whose spread "
        "is up to this fraction of the side (0: none)",
        low=0,
        high=0.1,
    )
    cutmix: float = setting(
        0.0,
        "chance that a training image gets a rectangle of another image of its batch pasted "
        "over it (CutMix), its target the two labels weighted by their shares of the pixels "
        "(0: none)",
        low=0,
        high=1,
    )
    stroke: float = setting(
        0.0,
        "largest change of stroke weight: the image blended up to this share toward its 3x3 "
        "grey-level dilation or erosion, which thins or thickens dark strokes by up to a pixel "
        "each side, as a bold or a light font gives (0: none)",
        low=0,
        high=1,
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name), strength_flag(f.name))


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides a training run's result."""

    model: int = setting(
        2,
        "which network: 1 or 2 conv blocks (the tutorial's), or 3 (batch norm, built for accuracy)",
        choices=(1, 2, 3),
        resume=True,
    )
    recipe: str | None = setting(
        None,
        "a preset of the options below; given options still win. strong: image size 32, "
        "standard pixels, augmentation, 20 epochs of batch 16, lr 2e-3 with 1 warmup epoch and "
        "cosine decay, weight decay 5e-4, label smoothing 0.1",
        choices=RECIPES,
    )
    data: str | None = setting(
        None,
        "data folder (CS50 or official GTSRB layout) or .npz from `cnn-jax pack`; none: the "
        "built-in synthetic signs",
        resume=True,
        flag="",
    )
    layout: str = setting("auto", "how the folder is laid out", choices=LAYOUTS, resume=True)
    decoder: str = setting(
        "opencv",
        "how a folder's images are decoded and resized: opencv, the tutorial's cv2.resize "
        "(bilinear on the 2x2 nearest pixels), or pillow, Pillow's smoothing bilinear (runs "
        "saved before cnn-jax decoded with OpenCV used it)",
        choices=DECODERS,
        resume=True,
    )
    image_size: int = setting(
        30, "resize to N x N (tutorial: 30)", low=1, high=MAX_IMAGE_SIZE, resume=True
    )
    num_classes: int | None = setting(
        None, "output classes; none: the data's (43 for GTSRB)", low=1, resume=True
    )
    pixels: str = setting(
        "unit",
        "unit: divide by 255; raw: 0..255 as the tutorial (often gets stuck); standard: "
        "each image to zero mean and unit spread; equalize: histogram equalisation, then "
        "standard; grey: each pixel's luminance in all three channels, then standard; local: "
        "each pixel's contrast to its neighbourhood's, then standard",
        choices=PIXELS,
        resume=True,
    )
    test_size: float = setting(
        0.4, "fraction held out for testing (tutorial: 0.4)", above=0, below=1, resume=True
    )
    split: str = setting(
        "random",
        "random (the tutorial's; near-copies leak) or track (whole tracks on one side)",
        choices=SPLITS,
        resume=True,
    )
    epochs: int = setting(10, "passes over the training split (tutorial: 10)", low=0)
    batch_size: int = setting(32, "images per step (Keras' default)", low=1, resume=True)
    learning_rate: float = setting(
        1e-3, "Adam learning rate (the peak, with a schedule)", above=0, resume=True, flag="--lr"
    )
    schedule: str = setting(
        "constant",
        "learning rate over the run: constant (the tutorial's), or cosine: linear warmup, then "
        "cosine decay to zero at the last step",
        choices=SCHEDULES,
        resume=True,
    )
    warmup_epochs: float = setting(
        0.0, "epochs of linear warmup (with --schedule cosine)", low=0, resume=True
    )
    weight_decay: float = setting(
        0.0,
        "decoupled weight decay of the kernels, as AdamW (0: none, the tutorial's)",
        low=0,
        resume=True,
    )
    label_smoothing: float = setting(
        0.0, "share of each label spread over all classes", low=0, below=1, resume=True
    )
    optimizer: str = setting(
        "keras-adam",
        "keras-adam: Keras' formula (epsilon on the uncorrected root); adam: optax's",
        choices=OPTIMIZERS,
        resume=True,
    )
    dropout: float = setting(0.5, "dropout rate before the last layer", low=0, below=1, resume=True)
    ema: float = setting(
        0.0,
        "keep an exponential moving average of the weights with this decay per step (0.999: "
        "about the last 1,000 steps), which is then the run's model: tested, checkpointed for "
        "evaluate, predict and export (0: none, the last step's weights)",
        low=0,
        below=1,
        resume=True,
    )
    sam: float = setting(
        0.0,
        "sharpness-aware minimisation (Foret et al. 2021): each step takes the gradient at "
        "the weights this far (in L2) up the batch's gradient, for twice the step's work "
        "(0: off; the paper's 0.05, chosen there with SGD, stalled the best single network's "
        "training here: README)",
        low=0,
        resume=True,
    )
    augment: bool = setting(
        False,
        "random rotation, scaling, shear, shift, brightness and contrast of each training "
        "image, on the device (no mirroring: it turns one sign into another)",
        resume=True,
    )
    strengths: Strengths = setting(Strengths(), "how far --augment goes", resume=True)
    stn: bool = setting(
        False,
        "Model 3 only: a spatial transformer in front, a small network that learns to turn, "
        "scale and shift each image before the classifier sees it",
        resume=True,
    )
    width: float = setting(
        1.0,
        "Model 3 only: its filters times this (32, 64 and 128 at 1; 48, 96 and 192 at 1.5)",
        low=0.25,
        high=4,
        resume=True,
    )
    ensemble: int = setting(
        1,
        "train N networks from seeds seed..seed+N-1 in one compiled program; evaluate and "
        "predict average their probabilities",
        low=1,
        high=64,
        resume=True,
    )
    distill_from: tuple[str, ...] = setting(
        (),
        "a trained run (an ensemble, say) whose probabilities for each training image are the "
        "targets instead of the labels (label smoothing then does not apply); it must have "
        "trained on no image of this run's test or validation split; repeat it for a committee "
        "of runs, whose probabilities are averaged",
        resume=True,
    )
    distill_views: bool = setting(
        False,
        "with --distill-from: the teacher classifies each training image as the student sees "
        "it, augmented, at every step (a 'consistent' teacher, Beyer et al. 2022) instead of "
        "once before training; each step then pays the teacher's forward passes (for each member "
        "of an ensemble student)",
        resume=True,
    )
    val_size: float = setting(
        0.0,
        "fraction of the training side held out for validation (whole tracks with --split "
        "track); the best epoch on it is the run's model. 0: none, the last epoch is",
        low=0,
        below=1,
        resume=True,
    )
    conv: str = setting(
        "auto",
        "convolution formulation, same values up to rounding: auto is onednn for model 3 on "
        "one CPU device in float32 where the onednn extra is installed, matmul for the rest "
        "on CPU, lax elsewhere",
        choices=CONVS,
    )
    dtype: str = setting(
        "float32", "compute type (parameters stay float32)", choices=DTYPES, resume=True
    )
    precision: str = setting(
        "default",
        "float32 matmul precision: default is TF32 on recent NVIDIA GPUs, highest is full "
        "float32 (parity)",
        choices=PRECISIONS,
        resume=True,
    )
    platform: str | None = setting(
        None, "where to train; none: JAX's default backend", choices=PLATFORMS
    )
    devices: int | None = setting(
        None,
        "data-parallel over N devices of the platform; none: all (on CPU, Model 3 gets one "
        "device per core, or one with oneDNN's convolutions, the others one: "
        "backend.split_cpu)",
        low=1,
    )
    steps_per_call: int | str = setting(
        "auto",
        "training steps per compiled call: auto is 1 on CPU and up to an epoch (16,384 "
        "images) on accelerators",
        low=1,
    )
    deterministic: bool = setting(
        True,
        "XLA's deterministic GPU ops, on unless --no-deterministic: GPU runs repeat bit for "
        "bit, at 15-35%% slower steps",
    )
    seed: int = setting(
        0, "drives the split, weights, batch order and dropout", low=0, high=MAX_SEED, resume=True
    )
    eval_every_epoch: bool = setting(
        False,
        "also test after every epoch (its figures in the progress line, metrics.json, "
        "TensorBoard and the report's curves); without it the test split is used once, at the "
        "end, as in the tutorial",
    )
    synthetic_per_class: int = setting(
        100, "synthetic images per class when no data is given", low=1, resume=True
    )

    def __post_init__(self):
        if isinstance(self.strengths, dict):  # as JSON or a Python caller gives it
            object.__setattr__(self, "strengths", strengths_from(self.strengths))
        # One run as a text (a Python caller, a run saved before committees), a list as JSON
        # gives it: the tuple that compares equal on resume.
        teachers = self.distill_from
        if teachers is None or isinstance(teachers, str | list):
            teachers = (teachers,) if isinstance(teachers, str) else tuple(teachers or ())
            object.__setattr__(self, "distill_from", teachers)
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.image_size < MIN_IMAGE_SIZE[self.model]:
            raise UserError(
                f"--image-size {self.image_size} is too small for --model {self.model}: it needs "
                f"at least {MIN_IMAGE_SIZE[self.model]}"
            )
        if self.stn and self.model != 3:
            raise UserError(f"--stn is for --model 3 only, not --model {self.model}")
        if self.width != 1 and self.model != 3:
            raise UserError(f"--width is for --model 3 only, not --model {self.model}")
        if len(set(self.distill_from)) < len(self.distill_from):
            raise UserError("--distill-from names a run twice: give each teacher once")
        if self.distill_views and not self.distill_from:
            raise UserError(
                "--distill-views has no effect without --distill-from: add a teacher, or drop it"
            )
        if self.distill_views and len(self.distill_from) > 1:
            raise UserError(
                f"--distill-views takes one --distill-from run (the teacher in the step), not "
                f"{len(self.distill_from)}: drop --distill-views to distill a committee"
            )
        if self.seed + self.ensemble - 1 > MAX_SEED:
            raise UserError(
                f"--seed {self.seed} with --ensemble {self.ensemble} needs seeds up to "
                f"{self.seed + self.ensemble - 1}, above {MAX_SEED}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def write(self, path: Path) -> None:
        write_whole(path, self.to_json() + "\n")


def flag(name: str) -> str:
    """How a user names a setting: its option, or 'the data argument'."""
    f = {f.name: f for f in dataclasses.fields(Config)}[name]
    given = f.metadata["flag"]
    if given == "":
        return f"the {name} argument"
    return given or f"--{name.replace('_', '-')}"


def strengths_from(given: dict) -> Strengths:
    """Strengths from a dict of some of its fields (the rest keep their defaults)."""
    names = {f.name for f in dataclasses.fields(Strengths)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise UserError(f"unknown augmentation strength {unknown[0]!r}: choose from "
                        f"{', '.join(sorted(names))}")  # fmt: skip
    return Strengths(**given)


# Settings added after runs were saved without them, with the value those runs used.
_BEFORE_THEM = {"decoder": "pillow"}


def saved_settings(saved: dict) -> dict:
    """A checkpoint's config dict as this version reads it: the settings it lacks take the
    value that the version which saved it used, and the six aug_* fields of runs saved before
    `strengths` existed become it."""
    settings = {**_BEFORE_THEM, **saved}
    old = [k for k in settings if k.startswith(STRENGTH_PREFIX)]
    flat = {k.removeprefix(STRENGTH_PREFIX): settings.pop(k) for k in old}
    if flat:
        settings["strengths"] = flat
    return settings


def resume_changes(saved: Config, config: Config) -> list[tuple[str, object, object]]:
    """(option, now, then) for each setting a resumed run must keep and `config` changes."""
    changes = []
    for key in RESUME_KEYS:
        then, now = getattr(saved, key), getattr(config, key)
        if key == "strengths":
            pairs = zip(dataclasses.astuple(now), dataclasses.astuple(then))
            names = (f.name for f in dataclasses.fields(Strengths))
            changes += [(strength_flag(k), a, b) for k, (a, b) in zip(names, pairs) if a != b]
        elif then != now:
            changes.append((flag(key), now, then))
    return changes


RESUME_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resume"])


# What each recipe sets; options given on the command line (or to `with_recipe`) override them.
RECIPE_SETTINGS = {
    "strong": dict(
        image_size=32,
        pixels="standard",
        augment=True,
        epochs=20,
        batch_size=16,
        learning_rate=2e-3,
        schedule="cosine",
        warmup_epochs=1.0,
        weight_decay=5e-4,
        label_smoothing=0.1,
    )
}


def with_recipe(recipe: str | None, **given) -> Config:
    """A Config from a recipe's settings, overridden by `given` (the options a user gave)."""
    if recipe is not None and recipe not in RECIPE_SETTINGS:
        raise UserError(f"--recipe must be one of {', '.join(RECIPE_SETTINGS)}, not {recipe!r}")
    return Config(**{**RECIPE_SETTINGS.get(recipe, {}), **given, "recipe": recipe})


def quick() -> Config:
    """A preset that trains in seconds, for smoke tests and first looks."""
    return Config(epochs=2, synthetic_per_class=20)
