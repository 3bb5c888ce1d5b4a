"""cnn-jax: the Keras traffic-sign tutorial's two CNNs, in JAX and Flax NNX."""

__version__ = "0.1.0"
