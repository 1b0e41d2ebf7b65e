"""Mixed precision by hand: float32 master weights, the forward and backward passes in a 16-bit dtype.

    runner = Runner(model, Adam(0.001), precision="mixed_bfloat16")

A training step in mixed precision (`mixed_gradients`):

    w16    = cast(w, bfloat16)                 every trainable float32 weight, inside the tape
    logits = model16(cast(x, bfloat16))        matmuls and convolutions in bfloat16
    L      = loss(cast(logits, float32))       softmax cross-entropy in float32
    g      = dL/dw = cast(dL/dw16, float32)    the cast's gradient brings g back to float32
    w      <- optimizer(g, w)                  float32 weights and float32 optimizer slots

Every layer of the model is reached, those nested in other layers included (tf.Module's traversal of
attributes, lists and dicts). A layer declaring `computes_in_float32` (BatchNorm for its statistics, a softmax
Activation) keeps its weights in float32 and computes in float32, as the loss does. The fused BatchNorm
(`mixed_input`) takes the 16-bit x as it is: FusedBatchNormV3 reads bfloat16 x with float32 gamma, beta and
statistics, accumulates in float32 and writes a bfloat16 y, so the activations stay in 16 bits from the first
layer to the logits. The formula's BatchNorm (fused=False) casts its 16-bit input up, computes in float32, and
the next layer casts down again (BatchNorm's docstring says where the kernel casts bfloat16 itself). float16 has
5 exponent bits: small gradients underflow to 0, so "mixed_float16" multiplies L by a loss scale S before
differentiating and divides g by S after (`LossScale`, the rule of Keras's LossScaleOptimizer): a step whose
scaled gradients overflow is skipped and S halves; after `growth_steps` good steps in a row S doubles. bfloat16
keeps float32's exponent range and needs no scaling.
"""
import contextlib

import tensorflow as tf

from core.module import Layer
from core.names import PRECISIONS

__all__ = ["PRECISIONS", "compute_dtype", "compute_in", "LossScale", "mixed_gradients"]

_COMPUTE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def compute_dtype(precision):
    """"float32" -> float32; "mixed_bfloat16" -> bfloat16; "mixed_float16" -> float16 (names: core.names)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _COMPUTE_DTYPES[precision]


def _layers(model):
    """Every Layer in `model` (itself, if it is one, then the nested ones at any depth: attributes, lists, dicts)."""
    nested = model._flatten(predicate=lambda value: isinstance(value, Layer))
    return ([model] if isinstance(model, Layer) else []) + list(nested)


@contextlib.contextmanager
def compute_in(model, dtype):
    """Within the block, `model`'s layers, nested ones included, compute in `dtype` from casts of their float32
    weights.

    Each layer's trainable variables (its attributes) are replaced by `cast(variable, dtype)` (read inside the
    caller's tape, so gradients reach the float32 variables: each weight is cast once per step) and its dtype by
    `dtype`, then restored on exit. Layers declaring `computes_in_float32` keep their float32 variables; those
    taking a 16-bit input (`mixed_input`) get `dtype` as their dtype, so their input is not cast up; the others
    stay in float32 (see the module docstring).
    """
    saved = []
    try:
        for layer in _layers(model):
            if layer.dtype is None:
                continue
            if layer.computes_in_float32:
                if layer.mixed_input:
                    saved.append((layer, layer.dtype, {}))
                    layer.dtype = dtype
                continue
            weights = {name: value for name, value in vars(layer).items()
                       if isinstance(value, tf.Variable) and value.trainable}
            saved.append((layer, layer.dtype, weights))
            for name, variable in weights.items():
                setattr(layer, name, tf.cast(variable, dtype))
            layer.dtype = dtype
        yield model
    finally:
        for layer, layer_dtype, weights in reversed(saved):
            for name, variable in weights.items():
                setattr(layer, name, variable)
            layer.dtype = layer_dtype


class LossScale(tf.Module):
    """Dynamic loss scale S for float16 gradients (Keras LossScaleOptimizer's rule and defaults).

        finite step:      good += 1; when good reaches growth_steps: S <- 2 S, good <- 0
        non-finite step:  S <- S / 2, good <- 0 (and the caller skips the update)
    """

    def __init__(self, initial_scale=2.0 ** 15, growth_steps=2000):
        super().__init__(name="loss_scale")
        self.growth_steps = int(growth_steps)
        self.scale = tf.Variable(float(initial_scale), dtype=tf.float32, trainable=False, name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")

    def update(self, finite):
        """Adjusts S after a step whose unscaled gradients were all finite (`finite`, a bool tensor) or not."""
        grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_steps)
        factor = tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5)
        self.scale.assign(self.scale * factor)
        self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)), self.good_steps + 1, 0))


def mixed_gradients(dtype, loss_scale=None):
    """A Runner `compute_gradients` computing in `dtype` with float32 weights (module docstring):
    (model, loss_fn, images, labels, variables) -> (float32 L, float32 logits, float32 gradients)."""

    def compute(model, loss_fn, images, labels, variables):
        with tf.GradientTape() as tape:
            with compute_in(model, dtype):
                logits = tf.cast(model(tf.cast(images, dtype), training=True), tf.float32)
            loss = loss_fn(logits, labels)
            scaled = loss if loss_scale is None else loss * loss_scale.scale
        gradients = tape.gradient(scaled, variables)
        if loss_scale is not None:
            gradients = [None if g is None else g / loss_scale.scale for g in gradients]
        return loss, logits, gradients

    return compute
