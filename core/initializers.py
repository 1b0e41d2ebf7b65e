"""Weight initializers written by hand.

Random ones draw from TensorFlow's global-seeded random ops, so after `tf.random.set_seed(seed)` the same
sequence of layer builds gives the same initial weights. All return float32 tensors of the given shape.
"""
import math

import tensorflow as tf


def glorot_uniform(shape, fan_in, fan_out):
    """w ~ U(-L, L), L = sqrt(6 / (fan_in + fan_out))  (Glorot & Bengio 2010, Keras's default kernel init).

    Dense [in, units]: fan_in = in, fan_out = units.
    Conv2D [kh, kw, in, filters]: fan_in = kh*kw*in, fan_out = kh*kw*filters.
    Var(w) = L^2 / 3 = 2 / (fan_in + fan_out).
    """
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.uniform(shape, minval=-limit, maxval=limit, dtype=tf.float32)


def truncated_normal(shape, stddev=0.1):
    """w ~ N(0, stddev^2) truncated to |w| <= 2 stddev (redrawn outside); the low-level codelab's init.

    `stddev` is the standard deviation of the normal before truncation (as `tf.random.truncated_normal`
    and `keras.initializers.TruncatedNormal`), so the actual std is about 0.88 * stddev.
    """
    return tf.random.truncated_normal(shape, mean=0.0, stddev=stddev, dtype=tf.float32)


def zeros(shape):
    """w = 0."""
    return tf.zeros(shape, dtype=tf.float32)


def constant(shape, value):
    """w = value everywhere (e.g. biases at 0.1 for ReLU layers, as the original codelab did)."""
    return tf.fill(shape, tf.constant(value, dtype=tf.float32))


KERNEL_INITIALIZERS = ("glorot_uniform", "truncated_normal")


def kernel(name, shape, fan_in, fan_out):
    """The kernel initializer chosen by name: "glorot_uniform" or "truncated_normal" (stddev 0.1)."""
    if name == "glorot_uniform":
        return glorot_uniform(shape, fan_in, fan_out)
    if name == "truncated_normal":
        return truncated_normal(shape, stddev=0.1)
    raise ValueError(f"unknown kernel_init {name!r}; expected one of {KERNEL_INITIALIZERS}")
