"""Prints the measured Flax-vs-Keras differences: forward logits and five Adam steps.

pip install -e ".[keras]"; python scripts/parity.py
"""

from keras_ref.parity import forward_difference, training_difference

for model in (1, 2):
    f = forward_difference(model)
    t = training_difference(model)
    print(
        f"model {model}: forward max |diff| {f['max_abs']:.3g} (logits up to "
        f"{f['logit_scale']:.3g}, same predictions: {f['same_predictions']}); 5 Adam steps max "
        f"|weight diff| {t['max_abs']:.3g} (weights moved up to {t['max_weight_change']:.3g})"
    )
