"""Beyond the tutorial: augmentation, Model 3 with batch norm, the recipe, ensembles, validation."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import SAME_FUNCTION, assert_same_function, assert_within, bound

from cnn_jax import augment, checkpoint, config, data, models, steps, train
from cnn_jax.checkpoint import Checkpoints
from cnn_jax.cli import main
from cnn_jax.config import Config as _Config
from cnn_jax.data import pixels as pixels_lib
from cnn_jax.inference import load_checkpoint
from cnn_jax.predictor import evaluate

Config = functools.partial(_Config, platform="cpu", devices=1)
# Model 3 with every new part switched on, small enough for seconds per epoch: 16x16 images
# keep every block's arithmetic (Model 3 needs 8) at a quarter of the tutorial size's work.
STRONG = Config(
    model=3,
    image_size=16,
    epochs=2,
    batch_size=32,
    synthetic_per_class=12,
    pixels="standard",
    augment=True,
    schedule="cosine",
    warmup_epochs=0.5,
    weight_decay=5e-4,
    label_smoothing=0.1,
)


@pytest.fixture(scope="module")
def small():
    from cnn_jax.data.synthetic import make_synthetic

    return make_synthetic(STRONG.synthetic_per_class, image_size=STRONG.image_size)


def _images(n=8, size=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_augmentation_keeps_shape_and_range_and_follows_its_key():
    images = _images()
    key = jax.random.key(3)
    out = np.asarray(augment.augment(key, images, augment.Strengths()))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images, atol=1)  # it does change the images
    again = np.asarray(augment.augment(key, images, augment.Strengths()))
    np.testing.assert_array_equal(out, again)
    other = np.asarray(augment.augment(jax.random.key(4), images, augment.Strengths()))
    assert not np.array_equal(out, other)


def test_augmentation_of_zero_strength_is_the_identity():
    images = _images()
    zero = augment.Strengths(0, 0, 0, 0, 0, 0)
    out = np.asarray(augment.augment(jax.random.key(0), images, zero))
    np.testing.assert_allclose(out, images, atol=1e-3)


def test_blur_and_noise_change_images_and_leave_the_other_draws_as_they_were():
    images = _images()
    key = jax.random.key(5)
    plain = np.asarray(augment.augment(key, images, augment.Strengths()))
    blurred = np.asarray(augment.augment(key, images, augment.Strengths(blur=2.0)))
    noisy = np.asarray(augment.augment(key, images, augment.Strengths(noise=0.2)))
    # Random pixels blurred lose differences between neighbours (each image by its own sigma,
    # drawn from 0..2); noise adds to them.
    rough = lambda x: np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))  # noqa: E731
    assert (
        np.all(rough(blurred) <= rough(plain)) and rough(blurred).mean() < 0.7 * rough(plain).mean()
    )
    assert np.all(rough(noisy) > rough(plain))
    assert 0 <= noisy.min() and noisy.max() <= 255
    # Without photometric changes, blurring is the last thing done: the geometric draw is the
    # one a run without blur makes (runs saved before blur existed resume unchanged).
    still = augment.Strengths(brightness=0, contrast=0)
    moved = augment.augment(key, images, still)
    both = np.asarray(augment.augment(key, images, dataclasses.replace(still, blur=1.0)))
    for k, one, got in zip(jax.random.split(key, len(images)), moved, both):
        extra = jax.random.fold_in(k, augment.EXTRA_DRAWS_TAG)
        sigma = jax.random.uniform(jax.random.split(extra, 3)[0], (), maxval=1.0)
        np.testing.assert_allclose(got, np.asarray(augment._blur(one, sigma)), atol=1e-3)


def test_erasing_replaces_one_rectangle_per_image_and_leaves_the_rest_as_drawn_without_it():
    images = np.random.default_rng(3).integers(0, 256, (16, 40, 40, 3), dtype=np.uint8)
    key = jax.random.key(11)
    plain = np.asarray(augment.augment(key, images, augment.Strengths()))
    erased = np.asarray(augment.augment(key, images, augment.Strengths(erase=0.5)))
    changed = np.abs(erased - plain).max(axis=-1) > 1e-3
    for i, one in enumerate(changed):
        rows, cols = np.nonzero(one.any(axis=1))[0], np.nonzero(one.any(axis=0))[0]
        if rows.size:  # a rectangle: every pixel between its first and last row and column
            box = one[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            assert box.all()
            painted = erased[i, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            np.testing.assert_allclose(
                painted, np.broadcast_to(plain[i].mean((0, 1)), painted.shape), rtol=1e-5
            )
            assert rows.size <= 20 and cols.size <= 20  # at most half the side
    assert 0.01 < changed.mean() < 0.2
    assert sum(c.any() for c in changed) >= 12


def test_an_elastic_distortion_moves_each_pixel_by_its_own_smooth_field():
    # A ramp along the columns, read bilinearly, gives back where each pixel was read from.
    side, largest = 32, 0.05
    ramp = np.broadcast_to(np.arange(side, dtype=np.float32)[None, :, None] * 4, (side, side, 3))
    images = np.repeat(ramp[None], 16, axis=0)
    only = augment.Strengths(0, 0, 0, 0, 0, 0, elastic=largest)
    key = jax.random.key(9)
    out = np.asarray(augment.augment(key, images, only))
    moved = out[..., 0] / 4 - np.arange(side)
    inner = (slice(None), slice(4, -4), slice(4, -4))  # away from the repeated edges
    keys = jax.random.split(key, len(images))
    bend = jax.vmap(lambda k: augment._bend(jax.random.fold_in(k, augment.ELASTIC_TAG), side,
                                             largest))(keys)  # fmt: skip
    np.testing.assert_allclose(moved[inner], np.asarray(bend)[..., 1][inner], atol=1e-3)
    # Each image by its own amount, under a few spreads of the largest; smooth: neighbours
    # move alike (independent draws per pixel would differ by 1.4 times their mean size).
    spread = np.abs(moved[inner]).mean(axis=(1, 2))
    assert spread.min() < 0.5 * spread.max() and spread.max() < 4 * largest * side
    assert np.abs(np.diff(moved[inner], axis=2)).mean() < 0.6 * np.abs(moved[inner]).mean()


def test_a_gamma_change_raises_each_image_to_one_power_within_its_reach():
    images = np.random.default_rng(4).integers(20, 236, (32, 12, 12, 3), dtype=np.uint8)
    only = augment.Strengths(0, 0, 0, 0, 0, 0, gamma=1.0)
    out = np.asarray(augment.augment(jax.random.key(2), images, only), np.float64)
    powers = np.log(out / 255) / np.log(images / 255.0)
    per_image = powers.reshape(32, -1)
    np.testing.assert_allclose(
        per_image, np.broadcast_to(per_image[:, :1], per_image.shape), rtol=2e-3
    )
    assert np.all((per_image > 0.5 - 1e-3) & (per_image < 2 + 1e-3))
    assert per_image[:, 0].min() < 0.8 and per_image[:, 0].max() > 1.25  # both ways


def test_a_stroke_change_thins_or_thickens_a_dark_bar_by_up_to_a_pixel_each_side():
    # A dark bar 4 pixels high on a light ground: dilation (max over 3x3) narrows it to 2 rows,
    # erosion (min) widens it to 6; the change blends toward either by its own share.
    light, dark = 200.0, 20.0
    bar = np.full((12, 12, 3), light, np.float32)
    bar[4:8, 2:10] = dark
    images = np.repeat(bar[None], 32, axis=0)
    only = augment.Strengths(0, 0, 0, 0, 0, 0, stroke=0.5)
    out = np.asarray(augment.augment(jax.random.key(6), images, only))
    np.testing.assert_allclose(out[:, 5:7, 3:9], dark, atol=1e-3)  # the bar's core stays
    np.testing.assert_allclose(out[:, 0:2], light, atol=1e-3)  # beyond a pixel: untouched
    edge = out[:, 4, 5, 0]  # the bar's top row: lightened when thinned
    rim = out[:, 3, 5, 0]  # the row above it: darkened when thickened
    thinned = (edge - dark) / (light - dark)
    thickened = (light - rim) / (light - dark)
    assert np.all((thinned > -1e-5) & (thinned < 0.5 + 1e-5))
    assert np.all((thickened > -1e-5) & (thickened < 0.5 + 1e-5))
    assert np.all(np.minimum(thinned, thickened) < 1e-5)  # one way per image, not both
    assert thinned.max() > 0.3 and thickened.max() > 0.3  # both ways, over the reach
    np.testing.assert_array_equal(out[..., 0], out[..., 1])  # each channel alike here


def test_a_colour_cast_scales_each_channel_of_an_image_by_its_own_factor():
    images = np.random.default_rng(5).integers(20, 190, (32, 12, 12, 3), dtype=np.uint8)
    only = augment.Strengths(0, 0, 0, 0, 0, 0, colour=0.3)
    out = np.asarray(augment.augment(jax.random.key(3), images, only), np.float64)
    factors = (out / images).reshape(32, -1, 3)
    np.testing.assert_allclose(factors, np.broadcast_to(factors[:, :1], factors.shape), rtol=1e-5)
    first = factors[:, 0]  # (image, channel)
    assert np.all((first > 0.7 - 1e-5) & (first < 1.3 + 1e-5))
    assert first.min() < 0.8 and first.max() > 1.2  # both ways, over the reach
    assert np.all(np.ptp(first, axis=1) > 1e-3)  # a cast: the channels apart, not a brightness


def test_a_change_of_aspect_stretches_the_width_alone_by_a_factor_within_its_reach():
    cols, rows = np.meshgrid(np.arange(16.0), np.arange(16.0))
    ramps = np.stack([10 + 10 * cols, 10 + 10 * rows, np.full_like(cols, 100)], axis=-1)
    images = np.broadcast_to(ramps, (32, 16, 16, 3)).astype(np.uint8)
    only = augment.Strengths(0, 0, 0, 0, 0, 0, aspect=0.25)
    out = np.asarray(augment.augment(jax.random.key(3), images, only), np.float64)
    np.testing.assert_allclose(out[..., 1:], images[..., 1:], atol=1e-3)  # the height kept
    widths = (out[:, :, 8, 0] - out[:, :, 7, 0]) / 10  # the column ramp's slope at the centre
    np.testing.assert_allclose(widths, widths[:, :1].repeat(16, axis=1), atol=1e-4)
    assert np.all((widths[:, 0] > 0.75 - 1e-4) & (widths[:, 0] < 1.25 + 1e-4))
    assert widths[:, 0].min() < 0.85 and widths[:, 0].max() > 1.15  # both ways, over the reach


def test_the_default_augmentation_draws_what_it_drew_before_blur_and_noise_existed():
    # Printed by cnn_jax/augment.py of af7579d for these images and key: a run saved then
    # resumes with the same changes.
    images = np.random.default_rng(0).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    out = np.asarray(augment.augment(jax.random.key(7), images, augment.Strengths()))
    np.testing.assert_allclose(out[:, 5, 5, 0], [135.770, 143.051, 209.561, 25.352], atol=0.01)
    means = [173.711, 99.353, 166.757, 90.051]
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), means, atol=0.01)


def test_a_blur_of_sigma_zero_is_the_identity_and_keeps_a_flat_image_flat():
    images = _images().astype(np.float32)
    for one in images:
        np.testing.assert_array_equal(np.asarray(augment._blur(one, jnp.float32(0))), one)
    flat = np.full((30, 30, 3), 77.0, np.float32)
    np.testing.assert_allclose(np.asarray(augment._blur(flat, jnp.float32(1.5))), flat, rtol=1e-6)


def test_augmentation_never_mirrors():
    # A left-right gradient image: a flip would turn its column means around.
    ramp = np.broadcast_to(np.linspace(0, 255, 30)[None, :, None], (30, 30, 3))
    images = np.repeat(ramp[None].astype(np.uint8), 64, axis=0)
    strengths = augment.Strengths(brightness=0, contrast=0)
    out = np.asarray(augment.augment(jax.random.key(1), images, strengths))
    cols = out.mean(axis=(1, 3))
    assert np.all(cols[:, -5:].mean(1) > cols[:, :5].mean(1))


def _assert_standardized(x, before):
    """Each image's mean 0 and spread 1, as far as float32 can: the standardisation's mean of n
    values in [0, 1] and the test's own mean of the result are each within n·eps of theirs
    (numerics.py), the first in units of the image's spread; the variances likewise."""
    axes = (1, 2, 3)
    n = x[0].size
    mean_scale = before.mean(axis=axes) / before.std(axis=axes) + np.abs(x).mean(axis=axes)
    assert_within(x.mean(axis=axes), 0, bound(n, mean_scale), "mean")
    assert_within(x.std(axis=axes), 1, bound(n, 1), "spread")


def test_standard_pixels_have_zero_mean_and_unit_spread():
    images = _images()
    x = data.scale_pixels(images, "standard")
    _assert_standardized(x, images / 255.0)
    flat = data.scale_pixels(np.full((1, 4, 4, 3), 9, np.uint8), "standard")
    assert np.all(np.isfinite(flat)) and np.all(flat == 0)


def test_grey_pixels_are_the_standardised_luminance_in_every_channel():
    images = _images()
    x = data.scale_pixels(images, "grey")
    assert x.shape == images.shape
    np.testing.assert_array_equal(x[..., 1:], np.repeat(x[..., :1], 2, axis=-1))
    luminance = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    _assert_standardized(x, np.repeat(luminance[..., None], 3, axis=-1) / 255.0)
    # A red and a green sign of one luminance on the same background reach the network alike:
    # what grey gives up, colour, and what standard pixels keep.
    red, green = np.full((2, 1, 4, 4, 3), 20.0, np.float32)
    red[0, 1:3, 1:3] = (255.0, 0.0, 0.0)
    green[0, 1:3, 1:3] = (0.0, 255.0 * 0.299 / 0.587, 0.0)
    np.testing.assert_allclose(data.scale_pixels(red, "grey"), data.scale_pixels(green, "grey"),
                               atol=1e-5)  # fmt: skip
    assert (
        np.abs(data.scale_pixels(red, "standard") - data.scale_pixels(green, "standard")).max() > 1
    )
    on_jax = jax.jit(lambda x: data.scale_pixels(x, "grey"))(jnp.asarray(images))
    np.testing.assert_allclose(on_jax, x, atol=6e-4)


def test_equalized_pixels_spread_a_dark_image_and_agree_between_numpy_and_jax():
    # A dark sign (values 0..40) on a bright sky: equalisation spreads the dark part apart.
    rng = np.random.default_rng(1)
    image = np.full((1, 16, 16, 3), 230, np.uint8)
    image[0, 4:12, 4:12] = rng.integers(0, 41, (8, 8, 3))
    eq = data.scale_pixels(image, "equalize")
    std = data.scale_pixels(image, "standard")
    sign = (slice(None), slice(4, 12), slice(4, 12))
    assert eq[sign].std() > 1.5 * std[sign].std()
    _assert_standardized(eq, pixels_lib._equalize(image.astype(np.float32)) / 255.0)
    # One tone curve for all channels: a pixel's channel order is kept.
    assert np.all(np.diff(image.astype(int), axis=-1) * np.diff(eq, axis=-1) >= 0)
    # A gamma-brightened grey image (a monotone, not linear, change) equalises to the same
    # image, exactly: the same integer counts, then the same float32 operations on the same
    # values; standard pixels, a linear map, cannot undo it.
    grey = np.repeat(image[..., :1], 3, axis=-1)
    brighter = (255 * (grey / 255) ** 0.5).round().astype(np.uint8)
    for pixels, same in (("equalize", True), ("standard", False)):
        change = np.abs(data.scale_pixels(brighter, pixels) - data.scale_pixels(grey, pixels))
        assert (change.max() == 0) == same
    # NumPy and XLA share the integer tone curve; they may sum the standardisation's mean and
    # spread (over 30 x 30 x 3 = 2,700 values) in other orders: a reordered float32 sum of n
    # terms moves by at most n * 2**-24 of their size, 1.6e-4 here, on values within +-4.
    batch = _images()
    on_jax = jax.jit(lambda x: data.scale_pixels(x, "equalize"))(jnp.asarray(batch))
    np.testing.assert_allclose(on_jax, data.scale_pixels(batch, "equalize"), atol=6e-4)
    flat = data.scale_pixels(np.full((1, 4, 4, 3), 9, np.uint8), "equalize")
    assert np.all(flat == 0)


def test_local_contrast_lifts_the_shaded_half_of_a_sign_and_agrees_between_numpy_and_jax():
    # Strokes (a checkerboard of 2-pixel squares) lit on the right, in deep shade on the left.
    squares = (np.indices((32, 32)) // 2).sum(0) % 2
    shade = np.where(np.arange(32) < 16, 0.15, 1.0)[None, :]
    image = ((60 + 120 * squares) * shade).round().astype(np.uint8)
    image = np.repeat(image[None, ..., None], 3, axis=-1)
    dark, lit = (
        (slice(None), slice(8, 24), slice(2, 10)),
        (slice(None), slice(8, 24), slice(22, 30)),
    )
    contrast = lambda x: x[dark].std() / x[lit].std()  # noqa: E731
    # One scale for the whole image keeps the shade's 0.15; the local spread lifts the shaded
    # strokes up to the floor, the image's mean spread (half the lit side's here): 0.24.
    standard = contrast(data.scale_pixels(image, "standard"))
    assert standard < 0.16 and contrast(data.scale_pixels(image, "local")) > 1.5 * standard
    _assert_standardized(data.scale_pixels(image, "local"),
                         pixels_lib._local_contrast(image.astype(np.float32)))  # fmt: skip
    # The same scene four times brighter is the same input; a flat image stays flat.
    darker = (image // 4).astype(np.uint8)
    np.testing.assert_allclose(data.scale_pixels(darker, "local"),
                               data.scale_pixels(darker * 4, "local"), atol=1e-5)  # fmt: skip
    assert np.abs(data.scale_pixels(np.full((1, 8, 8, 3), 9, np.uint8), "local")).max() < 1e-3
    batch = _images()
    on_jax = jax.jit(lambda x: data.scale_pixels(x, "local"))(jnp.asarray(batch))
    np.testing.assert_allclose(on_jax, data.scale_pixels(batch, "local"), atol=6e-4)


def test_model_3_shape_and_parameter_count():
    model = models.create_model(3, image_size=32, num_classes=43)
    assert models.count_params(model) == 823_051
    x = jnp.zeros((2, 32, 32, 3))
    assert model(x).shape == (2, 43)
    with pytest.raises(ValueError, match="too small for model 3"):
        models.create_model(3, image_size=7)


def test_model_3_evaluates_with_running_statistics(small):
    """In evaluation an image's logits do not depend on the rest of its batch."""
    trainer, state = steps.create_trainer(STRONG, 43)
    state = trainer.train_step(state, *trainer.place((small.images, small.labels)),
                               trainer.place(np.arange(32, dtype=np.int32)), 32, 0, 0)  # fmt: skip
    stats = jax.tree.leaves(state.batch_stats)
    assert len(stats) == 12 and any(np.abs(np.asarray(s)).sum() > 0 for s in stats[::2])
    images = trainer.place(small.images[:16])
    alone = trainer.predictor.apply(state.weights, images[:1])
    together = trainer.predictor.apply(state.weights, images)
    # Batch statistics would move the logits by their own spread; a batch of 1 against 16
    # may only reorder XLA's sums (numerics.py).
    assert_same_function(alone[0], together[0], "logits")


def test_recipe_sets_its_options_and_given_ones_win():
    cfg = config.with_recipe("strong", model=3, epochs=3)
    assert cfg.augment and cfg.schedule == "cosine" and cfg.image_size == 32
    assert cfg.epochs == 3 and cfg.recipe == "strong"
    assert config.with_recipe(None) == _Config()


def test_cli_recipe_is_overridable(tmp_path, capsys):
    args = ["train", "--model", "3", "--recipe", "strong", "--epochs", "1", "--image-size", "16"]
    args += ["--synthetic-per-class", "2", "--platform", "cpu", "--workdir", str(tmp_path)]
    assert main(args + ["--aug-rotate", "7", "--quiet"]) == 0
    saved = config.Config(**json.loads((tmp_path / "config.json").read_text()))
    assert saved.epochs == 1 and saved.image_size == 16  # given
    assert saved.augment and saved.label_smoothing == 0.1  # from the recipe
    assert saved.strengths == augment.Strengths(rotate=7.0)  # one given, the others' defaults


def test_augmentation_strengths_are_one_setting_also_for_runs_saved_before():
    assert Config(strengths={"shift": 0.2}).strengths == augment.Strengths(shift=0.2)
    saved = json.loads(Config(augment=True).to_json())
    assert saved["strengths"] == dataclasses.asdict(augment.Strengths())
    # A run saved when they were six aug_* fields reads as the same setting.
    flat = {k: v for k, v in saved.items() if k != "strengths"}
    flat.update(aug_rotate=5.0, aug_contrast=0.3)
    again = _Config(**config.saved_settings(flat))
    assert again.strengths == augment.Strengths(rotate=5.0, contrast=0.3)
    with pytest.raises(ValueError, match="unknown augmentation strength 'spin'"):
        Config(strengths={"spin": 1.0})
    with pytest.raises(ValueError, match="--aug-scale must be below 1"):
        Config(strengths={"scale": 1.0})


def _uninterrupted_and_resumed(cfg, data, workdir, stop_at_call):
    """(state, metrics) of a run straight through, and of one stopped after `stop_at_call`
    compiled calls and resumed; the resumed state's digest must equal the straight run's."""
    ref, ref_metrics = train.fit(cfg, data, verbose=False)
    stop = iter(range(100))  # fit polls once before the first call
    with pytest.raises(train.Interrupted):
        train.fit(cfg, data, workdir, verbose=False, should_stop=lambda: next(stop) == stop_at_call)
    state, metrics = train.fit(cfg, data, workdir, verbose=False)
    assert checkpoint.params_digest(state.weights) == checkpoint.params_digest(ref.weights)
    return (ref, ref_metrics), (state, metrics)


def test_resume_is_bit_identical_with_augmentation_and_batch_norm(small, tmp_path):
    (_, ref_metrics), (_, metrics) = _uninterrupted_and_resumed(STRONG, small, tmp_path, 5)
    assert metrics["test_accuracy"] == ref_metrics["test_accuracy"]


def test_the_moving_average_starts_short_then_decays_at_its_rate():
    average, weights = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    first = steps.moving_average(average, weights, 0.99, jnp.int32(0))  # decay 1/10 at step 0
    np.testing.assert_allclose(first["w"], 0.9, rtol=1e-6)
    late = steps.moving_average(average, weights, 0.99, jnp.int32(10**6))
    np.testing.assert_allclose(late["w"], 0.01, rtol=1e-5)


def test_the_moving_average_is_the_runs_model_and_resumes_exactly(small, tmp_path):
    cfg = dataclasses.replace(STRONG, ema=0.9)
    (ref, ref_metrics), (state, metrics) = _uninterrupted_and_resumed(cfg, small, tmp_path, 5)
    digest = checkpoint.params_digest
    assert digest(ref.weights) == digest(ref.ema) != digest(ref.last_weights)
    for key in ("test_accuracy", "test_loss", "last_weights_test_accuracy"):
        assert metrics[key] == ref_metrics[key]
    # The average only watches: the run trains as it would without it, and says what it scored.
    plain, plain_metrics = train.fit(STRONG, small, verbose=False)
    assert digest(plain.last_weights) == digest(ref.last_weights)
    assert plain_metrics["test_accuracy"] == metrics["last_weights_test_accuracy"]
    restored = load_checkpoint(tmp_path)
    assert digest(restored.params) == digest(state.ema)
    ev = evaluate(restored.predictor, restored.params, *_test_split(cfg, small))
    assert ev["accuracy"] == metrics["test_accuracy"]
    last = evaluate(restored.predictor, restored.predictor.place(state.last_weights),
                    *_test_split(cfg, small))  # fmt: skip
    assert last["accuracy"] == metrics["last_weights_test_accuracy"]


def test_an_ensembles_moving_average_has_one_per_member(small):
    trainer, state = steps.create_trainer(_ensemble(2, ema=0.9), 43, 1)
    images, labels = trainer.place((small.images, small.labels))
    order = trainer.place(np.arange(64, dtype=np.int32))
    state = trainer.train_step(state, images, labels, order, 64, 0, np.arange(2, dtype=np.int32))
    for average, last in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.last_weights)):
        assert average.shape == last.shape and average.shape[0] == 2
    ema, last = checkpoint.flatten(state.ema), checkpoint.flatten(state.last_weights)
    kernel = next(k for k in ema if k.endswith("kernel/value"))
    assert not np.allclose(ema[kernel], last[kernel])  # one step: 0.9 of the way


def test_sharpness_aware_takes_the_gradient_rho_up_its_own_direction():
    """On 0.5 * sum(a * w^2), whose gradient is a * w: SAM's is a * (w + rho * g / |g|)."""
    a, w = jnp.array([1.0, 4.0, -2.0]), {"w": jnp.array([0.5, -1.0, 2.0])}

    def grad_fn(params, batch_stats):  # the shape of jax.value_and_grad's in _member_step
        loss = 0.5 * jnp.sum(a * params["w"] ** 2)
        return (loss, (None, batch_stats)), ({"w": a * params["w"]}, batch_stats)

    state = steps.TrainState(w, None, 0, None, {"mean": jnp.zeros(3)})
    g = a * w["w"]
    sharp = steps._sharpness_aware(grad_fn, state, {"w": g}, 0.05)
    expected = a * (w["w"] + 0.05 * g / jnp.linalg.norm(g))
    np.testing.assert_allclose(sharp["w"], expected, rtol=1e-6)


def test_sam_changes_the_training_and_resumes_exactly(small, tmp_path):
    cfg = dataclasses.replace(STRONG, sam=0.05)
    (ref, _), _ = _uninterrupted_and_resumed(cfg, small, tmp_path, 5)
    plain, _ = train.fit(STRONG, small, verbose=False)
    assert checkpoint.params_digest(ref.weights) != checkpoint.params_digest(plain.weights)


def test_batch_norm_statistics_are_saved_and_restored(small, tmp_path):
    state, metrics = train.fit(dataclasses.replace(STRONG, epochs=1), small, tmp_path,
                               verbose=False)  # fmt: skip
    restored = load_checkpoint(tmp_path)
    saved = {k: v for k, v in checkpoint.flatten(restored.params).items() if "norms" in k}
    trained = {k: v for k, v in checkpoint.flatten(state.weights).items() if "norms" in k}
    assert any("mean" in k for k in saved) and saved.keys() == trained.keys()
    for k in saved:
        np.testing.assert_array_equal(saved[k], trained[k])
    means = [v for k, v in saved.items() if k.endswith("mean/value")]
    assert all(np.abs(m).sum() > 0 for m in means)  # trained, not the initial zeros
    ev = evaluate(restored.predictor, restored.params, small.images, small.labels)
    ref = evaluate(restored.predictor, restored.predictor.place(jax.device_get(state.weights)),
                   small.images, small.labels)  # fmt: skip
    assert ev["accuracy"] == ref["accuracy"]


def test_cosine_run_refuses_to_resume_with_other_epochs(small, tmp_path):
    cfg = dataclasses.replace(STRONG, epochs=1, augment=False)
    train.fit(cfg, small, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="cosine learning rate schedule spans"):
        train.fit(dataclasses.replace(cfg, epochs=2), small, tmp_path, verbose=False)


def _ensemble(k, **kw):
    return dataclasses.replace(STRONG, ensemble=k, **kw)


def test_an_ensemble_of_identical_members_equals_one_member(small):
    one_trainer, one = steps.create_trainer(STRONG, 43, 1)
    trainer, _ = steps.create_trainer(_ensemble(2), 43, 1)
    stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * 2), tree)  # noqa: E731
    state = trainer.place(stack(one))
    images, labels = trainer.place((small.images, small.labels))
    order = trainer.place(np.arange(64, dtype=np.int32))
    state = trainer.train_step(state, images, labels, order, 64, 0, np.zeros(2, np.int32))
    one = one_trainer.train_step(one, images, labels, order, 64, 0, 0)
    # The same seed draws the same augmentation and dropout: members stay equal, bit for bit,
    # and the batched step computes what one network's does (Adam's first steps turn float
    # rounding in tiny gradients into lr-sized differences, so the loss is compared).
    for leaf in jax.tree.leaves(state.weights):
        assert np.array_equal(leaf[0], leaf[1])
    # The batched program reorders the sums of the single one (numerics.py): same function.
    assert state.metrics[0] == pytest.approx(np.asarray(one.metrics), rel=SAME_FUNCTION)
    member = jax.tree.map(lambda a: a[0], state.weights)
    probs = trainer.predictor.probabilities(state.weights, images[:20])
    single = one_trainer.predictor.probabilities(member, images[:20])
    assert_same_function(probs, single, "probabilities")
    ev = evaluate(trainer.predictor, state.weights, small.images, small.labels)
    ev_one = evaluate(one_trainer.predictor, member, small.images, small.labels)
    assert ev["accuracy"] == ev_one["accuracy"] == ev["member_accuracy"][0]
    assert ev["loss"] == pytest.approx(ev_one["loss"], rel=SAME_FUNCTION)


def test_an_ensembles_members_classify_in_a_loop_on_the_cpu(small):
    # Unrolled, one member's work stalled another's convolutions (predictor.for_each_member);
    # a teacher inside a training step (--distill-views) keeps them unrolled.
    trainer, state = steps.create_trainer(_ensemble(2), 43, 1)
    text = lambda fn: str(jax.make_jaxpr(fn)(state.weights, small.images[:8]))  # noqa: E731
    predictor = trainer.predictor
    assert "scan[" in text(predictor.apply) and "scan[" not in text(predictor.mean_probabilities)


def test_ensemble_members_differ_and_resume_exactly(small, tmp_path):
    (ref, ref_metrics), (_, metrics) = _uninterrupted_and_resumed(_ensemble(2), small, tmp_path, 7)
    a, b = (jax.tree.leaves(ref.params)[0][m] for m in range(2))
    assert not np.allclose(a, b)  # seeds 0 and 1
    assert len(ref_metrics["member_test_accuracy"]) == 2
    assert metrics["member_test_accuracy"] == ref_metrics["member_test_accuracy"]
    restored = load_checkpoint(tmp_path)
    assert restored.predictor.members == 2 and restored.param_count() == metrics["params"]


def test_validation_split_is_carved_from_the_training_side():
    paths = np.array([f"{c}/{t:05d}_{i:05d}.ppm" for c in range(3) for t in range(10)
                      for i in range(5)])  # fmt: skip
    labels = np.array([int(p.split("/")[0]) for p in paths])
    ds = data.Dataset(np.zeros((len(labels), 2, 2, 3), np.uint8), labels, paths, ())
    cfg = Config(split="track", val_size=0.25, test_size=0.3)
    tr, val, te = data.split_run(cfg, ds)
    assert len(set(tr) | set(val) | set(te)) == len(labels)
    assert not (set(tr) & set(val)) and not (set(val) & set(te)) and not (set(tr) & set(te))
    tracks = lambda idx: {p.rsplit("_", 1)[0] for p in paths[idx]}  # noqa: E731
    assert not (tracks(tr) & tracks(val)) and not (tracks(val) & tracks(te))
    _, test_only = data.split_indices(labels, 0.3, cfg.seed, "track", paths)
    np.testing.assert_array_equal(te, test_only)  # the test split is the one without --val-size


def test_best_epoch_on_validation_is_the_runs_model(small, tmp_path):
    cfg = dataclasses.replace(STRONG, epochs=3, augment=False, val_size=0.3)
    state, metrics = train.fit(cfg, small, tmp_path, verbose=False)
    vals = [e["val_accuracy"] for e in metrics["epochs"]]
    best = len(vals) - int(np.argmax(vals[::-1]))  # on a tie, the later epoch
    assert metrics["selected_epoch"] == best and metrics["val_accuracy"] == max(vals)
    store = Checkpoints(tmp_path, read_only=True)
    assert store.read_meta(store.best_step()).epoch == best
    restored = load_checkpoint(tmp_path)
    ev = evaluate(restored.predictor, restored.params, *_test_split(cfg, small))
    assert ev["accuracy"] == metrics["test_accuracy"]


def test_without_validation_the_last_epoch_is_the_runs_model(small, tmp_path):
    cfg = dataclasses.replace(STRONG, epochs=2, augment=False)
    _, metrics = train.fit(cfg, small, tmp_path, verbose=False)
    assert metrics["selected_epoch"] == 2
    assert load_checkpoint(tmp_path).meta.epoch == 2


def _test_split(cfg, ds):
    _, _, te = data.split_run(cfg, ds)
    return ds.images[te], ds.labels[te]


def test_evaluate_and_predict_report_each_ensemble_member(tmp_path, capsys):
    from PIL import Image

    args = ["train", "--ensemble", "2", "--epochs", "1", "--synthetic-per-class", "4"]
    assert main(args + ["--platform", "cpu", "--workdir", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path), "--platform", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ensemble member 0: accuracy" in out and "ensemble member 1: accuracy" in out
    image = tmp_path / "sign.png"
    Image.fromarray(_images(1)[0]).save(image)
    assert main(["predict", str(tmp_path), str(image), "--platform", "cpu", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert len(row["members"]) == 2 and len(row["top"]) == 3
    assert all(0 <= m["class"] < 43 and 0 < m["probability"] <= 1 for m in row["members"])


def test_seeds_script_runs_each_seed_and_prints_the_mean(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "seeds.py"
    out = subprocess.run(
        [sys.executable, str(script), "--seeds", "0", "1", "--out", str(tmp_path), "--",
         "--epochs", "1", "--synthetic-per-class", "2", "--platform", "cpu"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    runs = [json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    exact = [m["test_accuracy"] for m in runs]
    assert [r[1] for r in rows] == [f"{a:.4f}" for a in exact]
    assert f"mean {sum(exact) / 2:.4f}" in out


def test_a_run_begun_under_an_older_recipe_resumes_with_the_same_command(tmp_path, capsys):
    args = ["train", "--model", "3", "--recipe", "strong", "--epochs", "2", "--image-size", "16"]
    args += ["--synthetic-per-class", "2", "--platform", "cpu", "--workdir", str(tmp_path)]
    # The run began when the recipe's batch was 64 (its default before it became 16).
    assert main(args + ["--batch-size", "64", "--quiet"]) == 0
    capsys.readouterr()
    assert main(args + ["--quiet"]) == 0
    assert "resuming with the run's --batch-size 64 (--recipe strong now sets 16)" in (
        capsys.readouterr().err
    )
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 64
    # A setting given still has to match the run's.
    assert main(args + ["--batch-size", "32", "--quiet"]) == 2
    assert "--batch-size is 32 but the run" in capsys.readouterr().err
