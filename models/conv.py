"""Convolutional networks on images x [N, H, W, C] -> logits [N, num_classes] (NHWC, 'same' padding: a stride s
maps H -> ceil(H / s); the codelab's MNIST is 28x28x1 in 10 classes, so 28 -> 14 -> 7).

Each convolution is  y = relu(conv2d(x, w[kh, kw, in, out], stride) + b); with batch norm the bias is left
out and  y = relu(beta + (z - mean) / sqrt(variance + epsilon))  with z = conv2d(x, w)  (center, no scale:
the ReLU that follows makes a scale gamma redundant).
"""
from core.initializers import GlorotUniform, TruncatedNormal
from core.layers import Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, Sequential


def _conv_relu(filters, kernel_size, strides, name):
    return [Conv2D(filters, kernel_size, strides=strides, padding="same", activation="relu", name=name)]


def _bn_relu(layer, synchronized):
    """layer (no bias) -> BatchNorm(center, no scale) -> ReLU, the batch-norm and ReLU named after the layer;
    synchronized: the BatchNorm normalizes with the global batch's statistics under a strategy."""
    return [layer,
            BatchNorm(center=True, scale=False, synchronized=synchronized, name=f"{layer.name}_bn"),
            Activation("relu", name=f"{layer.name}_relu")]


def _conv_bn_relu(filters, kernel_size, strides, name, synchronized, w_init=GlorotUniform()):
    return _bn_relu(Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                           w_init=w_init, name=name), synchronized)


def _dense_bn_relu(units, name, synchronized, w_init=GlorotUniform()):
    return _bn_relu(Dense(units, use_bias=False, w_init=w_init, name=name), synchronized)


def _head(dropout, num_classes):
    """[dropout ->] dense num_classes logits; a dropout rate of 0 leaves the Dropout layer out."""
    return ([Dropout(dropout, name="dropout")] if dropout else []) + [Dense(num_classes, name="logits")]


def conv(dropout=0.5, num_classes=10):
    """28x28x1 -> conv 3x3x12 -> 6x6x24 s2 (14x14) -> 6x6x32 s2 (7x7) -> flatten 1568 -> dense 200 -> dense 10
    (for MNIST; other images give other sizes, num_classes other logits)."""
    return Sequential(
        _conv_relu(12, 3, 1, "conv1")
        + _conv_relu(24, 6, 2, "conv2")
        + _conv_relu(32, 6, 2, "conv3")
        + [Flatten(name="flatten"), Dense(200, activation="relu", name="dense1")]
        + _head(dropout, num_classes),
        name="conv")


def conv_bn(dropout=0.3, num_classes=10, sync_batch_norm=False):
    """`conv` with BatchNorm(center, no scale) + ReLU after each convolution and the dense 200 (no biases);
    sync_batch_norm: each BatchNorm uses the global batch's statistics under a strategy."""
    sync = sync_batch_norm
    return Sequential(
        _conv_bn_relu(12, 3, 1, "conv1", sync)
        + _conv_bn_relu(24, 6, 2, "conv2", sync)
        + _conv_bn_relu(32, 6, 2, "conv3", sync)
        + [Flatten(name="flatten")]
        + _dense_bn_relu(200, "dense1", sync)
        + _head(dropout, num_classes),
        name="conv_bn")


def conv_bn_big(dropout=0.25, num_classes=10, sync_batch_norm=False):
    """The original codelab's best: conv 6x6x24 -> 5x5x48 s2 -> 4x4x64 s2 -> dense 200, each BN + ReLU.

    Weights start as in that codelab: truncated normal, stddev 0.1. sync_batch_norm: as in conv_bn.
    """
    init, sync = TruncatedNormal(stddev=0.1), sync_batch_norm
    return Sequential(
        _conv_bn_relu(24, 6, 1, "conv1", sync, init)
        + _conv_bn_relu(48, 5, 2, "conv2", sync, init)
        + _conv_bn_relu(64, 4, 2, "conv3", sync, init)
        + [Flatten(name="flatten")]
        + _dense_bn_relu(200, "dense1", sync, init)
        + _head(dropout, num_classes),
        name="conv_bn_big")


def conv_small(dropout=0.35, num_classes=10):
    """The practical's convnet: conv 6x6x6 -> 5x5x12 s2 -> 4x4x24 s2 -> flatten 1176 -> dense 200 -> dense 10
    (on MNIST)."""
    return Sequential(
        _conv_relu(6, 6, 1, "conv1")
        + _conv_relu(12, 5, 2, "conv2")
        + _conv_relu(24, 4, 2, "conv3")
        + [Flatten(name="flatten"), Dense(200, activation="relu", name="dense1")]
        + _head(dropout, num_classes),
        name="conv_small")
