"""Layers written by hand, each computing exactly what the Keras layer of the same name computes.

Shapes use N for the batch dimension. Images are NHWC: [N, height, width, channels].
Variables are created by `build(input_shape, dtype)`, either explicitly or lazily on the first call, in the
dtype of the inputs (see core/module.py, the base `Layer`); a built layer never creates variables again, so a
model built eagerly can be traced by `tf.function` any number of times.
Layers return logits (no softmax); `Sequential.predict` applies the softmax.

Each layer also carries its backward pass, derived by hand (docs/backprop.md):
    y, cache = layer.forward_with_cache(x, training)     the forward pass and what the backward pass needs
    dx, grads = layer.backward(dy, cache)                 dy = dL/dy -> dx = dL/dx, grads = {"w": dL/dw, ...}
The cache is returned, never stored on the layer, so a traced step stays a pure function of its inputs and
variables; `core.backprop` chains these through a Sequential.

Two bases hold what layers share: `Affine`, y = activation(linear(x, w) + b) with its kernel, bias, activation
and their backward pass (Dense, Conv2D, DepthwiseConv2D), and `Windowed`, the window, stride and padding
geometry (Conv2D, DepthwiseConv2D, MaxPool2D). Each class gives its math first (`_forward`, `backward`) and its
display after (`output_shape`, `formula`, `backward_formula`).
"""
import math

import tensorflow as tf

from core import activations, distribute, subpixel
from core.initializers import GlorotUniform, Zeros
from core.module import Layer, activated, batch_shape, initializer, padding_mode, pair, shape_str


def _bias_activation(layer, z):
    """activation(z + b) of an Affine layer. fused: tf.nn.bias_add and the activation's kernel
    (activations.kernel: tf.nn.relu), which TensorFlow's graph optimizer merges with the matmul or convolution
    before them into one kernel; else the formula's `+` and activation. The same numbers (tests/test_fast_paths.py)."""
    if layer.fused:
        if layer.use_bias:
            z = tf.nn.bias_add(z, layer.b)
        return activations.kernel(layer.activation)(z)
    if layer.use_bias:
        z = z + layer.b
    return layer.activation(z)


def _activation_backward(fn, y_shape):
    """(name of dL/dz, [its formula]) for y = fn(z): ("dy", []) for the identity, else
    ("dz", ["dz[N,...] = dy * [y > 0]"]) and so on."""
    if not activations.name_of(fn):
        return "dy", []
    return "dz", [f"dz{shape_str(y_shape)} = {activations.backward_formula(fn)}"]


class Affine(Layer):
    """y = activation(z + b), z = linear(x, w): a layer with a kernel w and a bias b, linear in x and in w.

    w = w_init(kernel shape, dtype) (default Glorot uniform); b = b_init([C'], dtype) (default zeros), one value per
    channel of y (its last dimension C'). A subclass writes the linear map and its two gradients, the math:
        `_kernel_shape(input_shape)`, `_linear(x)` = z without the bias,
        `_kernel_gradient(x, dz)` = dL/dw and `_input_gradient(x, dz)` = dL/dx for dz = dL/dz,
    then their formulas (`_linear_formula`, `_kernel_gradient_formula`, `_input_gradient_formula`); the bias,
    the activation, the variables and the backward pass through them are written here once.
    """

    def __init__(self, activation=None, use_bias=True, w_init=GlorotUniform(), b_init=Zeros(), fused=True,
                 name=None):
        super().__init__(name=name)
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.fused = bool(fused)
        self.w_init = initializer(w_init, "w_init", self)
        self.b_init = initializer(b_init, "b_init", self)

    def _create_variables(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(f"{self}: the input's last dimension (features or channels) must be known, "
                             f"got {shape_str(input_shape)}")
        super()._create_variables(input_shape)
        self.w = tf.Variable(self.w_init(self._kernel_shape(input_shape), self.dtype), name="w")
        if self.use_bias:
            self.b = tf.Variable(self.b_init([self.output_shape(input_shape)[-1]], self.dtype), name="b")

    def _forward(self, x, training):
        return _bias_activation(self, self._linear(x))

    def backward(self, dy, cache):
        """With dz = dL/dz for z = linear(x, w) + b (dz = dy * activation'(z), written with y: activations.backward):
        dw = `_kernel_gradient(x, dz)`;  db[C'] = sum of dz over every axis but the last;
        dx = `_input_gradient(x, dz)`."""
        x, y = cache
        dz = activations.backward(self.activation, dy, y)
        grads = {"w": self._kernel_gradient(x, dz)}
        if self.use_bias:
            grads["b"] = tf.reduce_sum(dz, axis=list(range(len(dz.shape) - 1)))
        return self._input_gradient(x, dz), grads

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        z = self._linear_formula(input_shape)
        if self.use_bias:
            z += f" + b[{self.output_shape(input_shape)[-1]}]"
        return activated(self.activation, z)

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        y_shape = self.output_shape(input_shape)
        dz, parts = _activation_backward(self.activation, y_shape)
        parts.append(self._kernel_gradient_formula(input_shape, dz))
        if self.use_bias:
            axes = "N" if len(y_shape) == 2 else "N,H',W'"
            parts.append(f"db[{y_shape[-1]}] = sum_{axes} {dz}")
        parts.append(self._input_gradient_formula(input_shape, dz))
        return "; ".join(parts)


class Windowed(Layer):
    """A kh x kw window slid over x [N, H, W, C] with strides (sh, sw): the geometry of Conv2D, DepthwiseConv2D
    and MaxPool2D. Output row i reads rows i*sh .. i*sh + kh - 1 of the padded input x_pad; along H (W likewise):
        padding "valid": no padding, H' = ceil((H - kh + 1) / sh) (the window must fit: H >= kh);
        padding "same":  H' = ceil(H / sh); the total padding P = max((H' - 1) * sh + kh - H, 0) is split
                         top = P // 2, bottom = P - top, so an odd P puts the extra row at the bottom (and
                         column at the right), exactly as TensorFlow and Keras do.
    A subclass passes the window to `__init__` and says how many channels its output has (`_channels_out`).
    """

    input_rank = 4

    def __init__(self, window, strides, padding, window_name="kernel_size", **kwargs):
        super().__init__(**kwargs)
        self.window = pair(window, window_name, self)
        self.strides = self.window if strides is None else pair(strides, "strides", self)
        self.padding = padding_mode(padding, self)

    def _create_variables(self, input_shape):
        if self.padding == "valid":
            for size, k in zip(input_shape[1:3], self.window):
                if size is not None and size < k:
                    raise ValueError(f"{self}: input {shape_str(input_shape)} is smaller than the "
                                     f"{self.window[0]}x{self.window[1]} window with 'valid' padding")
        super()._create_variables(input_shape)

    def _tf_strides(self):
        """(1, sh, sw, 1) and "SAME" / "VALID", as TensorFlow's window ops take them."""
        return (1,) + self.strides + (1,), self.padding.upper()

    def padding_amounts(self, input_shape):
        """((top, bottom), (left, right)) of padding for x [N, H, W, C] (class docstring); None where unknown."""
        return tuple(self._along(size, k, s)[1] for size, k, s in zip(input_shape[1:3], self.window, self.strides))

    def _along(self, size, k, s):
        """(output size, (padding before, padding after)) along an axis of `size` (None: unknown)."""
        if size is None:
            return None, None
        if self.padding == "valid":
            return -(-(size - k + 1) // s), (0, 0)
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return out, (total // 2, total - total // 2)

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        size = tuple(self._along(n, k, s)[0] for n, k, s in zip(input_shape[1:3], self.window, self.strides))
        return (None,) + size + (self._channels_out(input_shape[-1]),)

    def _channels_out(self, channels):
        return channels

    def _window_text(self):
        """"stride 2, same" ("stride 1x2, valid" for unequal strides)."""
        sh, sw = self.strides
        return f"stride {sh if sh == sw else f'{sh}x{sw}'}, {self.padding}"


class Dense(Affine):
    """Fully connected layer: y = activation(x @ w + b).

    x [N, in], w [in, units], b [units] -> y [N, units].
    w = w_init([in, units], dtype) (default Glorot uniform, fan_in = in, fan_out = units);
    b = b_init([units], dtype) (default zeros). Any `init(shape, dtype)` of core/initializers.py will do.
    """

    input_rank = 2

    def __init__(self, units, activation=None, use_bias=True, w_init=GlorotUniform(), b_init=Zeros(), fused=True,
                 name=None):
        super().__init__(activation, use_bias, w_init, b_init, fused, name=name)
        if not isinstance(units, int) or units <= 0:
            raise ValueError(f"{self}: units must be a positive int, got {units!r}")
        self.units = units

    def _kernel_shape(self, input_shape):
        return (input_shape[-1], self.units)

    def _linear(self, x):
        return tf.matmul(x, self.w)

    def _kernel_gradient(self, x, dz):
        """dw[in, units] = xᵀ[in, N] @ dz[N, units]: one outer product per example, summed over the batch."""
        return tf.matmul(x, dz, transpose_a=True)

    def _input_gradient(self, x, dz):
        """dx[N, in] = dz[N, units] @ wᵀ[units, in]."""
        return tf.matmul(dz, self.w, transpose_b=True)

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return input_shape[:-1] + (self.units,)

    def _linear_formula(self, input_shape):
        return f"x{shape_str(input_shape)} @ w[{input_shape[-1]},{self.units}]"

    def _kernel_gradient_formula(self, input_shape, dz):
        return f"dw[{input_shape[-1]},{self.units}] = xᵀ[{input_shape[-1]},N] @ {dz}[N,{self.units}]"

    def _input_gradient_formula(self, input_shape, dz):
        return f"dx{shape_str(input_shape)} = {dz} @ wᵀ[{self.units},{input_shape[-1]}]"


class Conv2D(Windowed, Affine):
    """2-D convolution: y = activation(conv2d(x, w, stride, padding) + b).

    x [N, H, W, in], w [kh, kw, in, filters] (HWIO), b [filters] -> y [N, H', W', filters] with
    y[n, i, j, f] = sum_{di, dj, c} x_pad[n, i*sh + di, j*sw + dj, c] * w[di, dj, c, f] + b[f]
    (H', W' and the padding of x_pad: `Windowed`).
    w = w_init([kh, kw, in, filters], dtype) (default Glorot uniform, fan_in = kh*kw*in, fan_out = kh*kw*filters);
    b = b_init([filters], dtype) (default zeros).
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", activation=None, use_bias=True,
                 w_init=GlorotUniform(), b_init=Zeros(), fused=True, name=None):
        super().__init__(kernel_size, strides, padding, activation=activation, use_bias=use_bias, w_init=w_init,
                         b_init=b_init, fused=fused, name=name)
        if not isinstance(filters, int) or filters <= 0:
            raise ValueError(f"{self}: filters must be a positive int, got {filters!r}")
        self.filters = filters

    @property
    def kernel_size(self):
        return self.window

    def _kernel_shape(self, input_shape):
        return self.kernel_size + (input_shape[-1], self.filters)

    def _linear(self, x):
        """z = conv2d(x, w). fused (the fast path): where `subpixel.pays`, the same convolution whose input gradient
        is computed as one stride-1 convolution (core/subpixel.py) instead of TensorFlow's conv2d_backprop_input."""
        if self.fused and subpixel.pays(self.kernel_size, self.strides) and None not in x.shape[1:3]:
            return subpixel.conv2d(x, self.w, self.strides[0], self.padding.upper())
        return tf.nn.conv2d(x, self.w, *self._tf_strides())

    def _kernel_gradient(self, x, dz):
        """dw[di, dj, c, f] = sum_{n, i, j} x_pad[n, i*sh + di, j*sw + dj, c] * dz[n, i, j, f], with x_pad the
        padded input of the forward pass: a correlation of the input with dz (each weight met every window it was
        applied to), on TensorFlow's kernel for it (conv2d_backprop_filter); a test checks it against the sum."""
        return tf.compat.v1.nn.conv2d_backprop_filter(x, tf.shape(self.w), dz, *self._tf_strides())

    def _input_gradient(self, x, dz):
        """dx_pad[n, p, q, c] = sum_{i*sh + di = p, j*sw + dj = q} sum_f dz[n, i, j, f] * w[di, dj, c, f], then
        dx = dx_pad without the padding: the transposed convolution (each output sends dz back through its window's
        weights), on TensorFlow's kernel for it (conv2d_transpose); a test checks it against the sum."""
        return tf.nn.conv2d_transpose(dz, self.w, tf.shape(x), *self._tf_strides())

    def _channels_out(self, channels):
        return self.filters

    def _linear_formula(self, input_shape):
        return (f"conv2d(x{shape_str(input_shape)}, w{shape_str(self._kernel_shape(input_shape))}, "
                f"{self._window_text()})")

    def _kernel_gradient_formula(self, input_shape, dz):
        return f"dw{shape_str(self._kernel_shape(input_shape))} = correlate(x_pad, {dz})"

    def _input_gradient_formula(self, input_shape, dz):
        return (f"dx{shape_str(input_shape)} = conv2d_transpose({dz}{shape_str(self.output_shape(input_shape))}, w, "
                f"{self._window_text()})")


class DepthwiseConv2D(Windowed, Affine):
    """Depthwise 2-D convolution: each input channel convolved with its own m filters, no sum over channels:
    y = activation(depthwise_conv2d(x, w, stride, padding) + b).

    x [N, H, W, C], w [kh, kw, C, m] (m = depth_multiplier), b [C*m] -> y [N, H', W', C*m] with
    y[n, i, j, c*m + k] = sum_{di, dj} x_pad[n, i*sh + di, j*sw + dj, c] * w[di, dj, c, k] + b[c*m + k]
    (H', W' and the padding of x_pad: `Windowed`). kh*kw*C*m weights where Conv2D with C*m filters has C times
    as many. w = w_init([kh, kw, C, m], dtype) (default Glorot uniform with the fans of that shape, as Keras:
    fan_in = kh*kw*C, fan_out = kh*kw*m); b = b_init([C*m], dtype) (default zeros).
    """

    def __init__(self, kernel_size, strides=1, padding="same", depth_multiplier=1, activation=None, use_bias=True,
                 w_init=GlorotUniform(), b_init=Zeros(), fused=True, name=None):
        super().__init__(kernel_size, strides, padding, activation=activation, use_bias=use_bias, w_init=w_init,
                         b_init=b_init, fused=fused, name=name)
        if not isinstance(depth_multiplier, int) or depth_multiplier <= 0:
            raise ValueError(f"{self}: depth_multiplier must be a positive int, got {depth_multiplier!r}")
        self.depth_multiplier = depth_multiplier

    @property
    def kernel_size(self):
        return self.window

    def _kernel_shape(self, input_shape):
        return self.kernel_size + (input_shape[-1], self.depth_multiplier)

    def _linear(self, x):
        return tf.nn.depthwise_conv2d(x, self.w, *self._tf_strides())

    def _kernel_gradient(self, x, dz):
        """dw[di, dj, c, k] = sum_{n, i, j} x_pad[n, i*sh + di, j*sw + dj, c] * dz[n, i, j, c*m + k]: channel c of the
        input correlated with the m channels of dz it produced (TensorFlow's depthwise_conv2d_backprop_filter)."""
        return tf.nn.depthwise_conv2d_backprop_filter(x, tf.shape(self.w), dz, *self._tf_strides())

    def _input_gradient(self, x, dz):
        """dx_pad[n, p, q, c] = sum_{i*sh + di = p, j*sw + dj = q} sum_k dz[n, i, j, c*m + k] * w[di, dj, c, k], then
        dx = dx_pad without the padding: Conv2D's transposed convolution, each channel on its own
        (TensorFlow's depthwise_conv2d_backprop_input)."""
        return tf.nn.depthwise_conv2d_backprop_input(tf.shape(x), self.w, dz, *self._tf_strides())

    def _channels_out(self, channels):
        return None if channels is None else channels * self.depth_multiplier

    def _linear_formula(self, input_shape):
        return (f"depthwise_conv2d(x{shape_str(input_shape)}, w{shape_str(self._kernel_shape(input_shape))}, "
                f"{self._window_text()})")

    def _kernel_gradient_formula(self, input_shape, dz):
        return f"dw{shape_str(self._kernel_shape(input_shape))} = correlate_per_channel(x_pad, {dz})"

    def _input_gradient_formula(self, input_shape, dz):
        return (f"dx{shape_str(input_shape)} = depthwise_conv2d_transpose({dz}"
                f"{shape_str(self.output_shape(input_shape))}, w, {self._window_text()})")


def _pixels_per_group(channels, width):
    """k, the fewest neighbouring pixels whose channels together are a multiple of 16 (oneDNN's 16-bit batch
    norm kernel), if the width is a multiple of k; else None."""
    k = 16 // math.gcd(channels, 16)
    return k if width is not None and width % k == 0 else None


class BatchNorm(Layer):
    """Batch normalization over the last axis (features or channels), for x [N, C] or [N, H, W, C].

    y = gamma * (x - mean) / sqrt(variance + epsilon) + beta, with gamma, beta, mean, variance of shape [C].
    training: mean, variance = the batch mean and biased variance (divide by the count) over every axis
              but the last, and
              moving_mean     = moving_mean * momentum + mean * (1 - momentum)
              moving_variance = moving_variance * momentum + variance * (1 - momentum)
    inference: mean, variance = moving_mean, moving_variance; nothing changes.
    gamma (init 1) exists only if scale, beta (init 0) only if center; moving_mean (init 0) and
    moving_variance (init 1) are not trainable. Evaluated in Keras's op order (see `_normalize`).
    Under a tf.distribute strategy the batch is each replica's slice: its own statistics (as Keras), or
    with `synchronized` those of the global batch (core.distribute.cross_replica_moments). The moving
    statistics are ON_READ / MEAN: one copy per replica, read (saved, exported) as their mean.

    fused (default): for x [N, H, W, C] the whole formula runs as one kernel, FusedBatchNormV3, in training and
    inference, equal to the formula to float32 rounding (tests/test_fast_paths.py); it takes a 16-bit x with
    float32 gamma, beta and statistics (`mixed_input`; with 12 or 24 channels, as a view of 48, `_fused_grouped`,
    with the ReLU after it inside where Sequential merges them, `call_with_relu`).
    fused=False: the formula's ops, the reference. The formula also runs where the kernel does not pay or cannot
    run: x [N, C] (as [N, 1, 1, C] the kernel measured 3x slower than the formula), float64 variables, and
    training with `synchronized`. The hand-written backward pass (`backward`) is always the formula's.

    Under mixed precision it computes in float32 (`computes_in_float32`): its mean and variance sum many values,
    and its moving statistics move by steps of 1 - momentum of their size, both lost in 8 bits of mantissa.
    """

    computes_in_float32 = True

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True, synchronized=False, fused=True,
                 name=None):
        super().__init__(name=name)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{self}: momentum must be in [0, 1], got {momentum!r}")
        if epsilon <= 0:
            raise ValueError(f"{self}: epsilon must be > 0, got {epsilon!r}")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.synchronized = synchronized
        self.fused = bool(fused)

    @property
    def mixed_input(self):
        """Whether the layer takes a 16-bit x and keeps its variables and statistics in float32 (the fused
        kernel does; the formula's ops need one dtype, so mixed precision casts x up for them)."""
        return self.fused and not self.synchronized and self._fusable()

    def _fusable(self):
        return self.built and len(self.input_shape) == 4 and self.moving_mean.dtype == tf.float32

    def _runs_kernel(self, training):
        """Whether a call runs the fused kernel (`_fused`) rather than the formula's ops."""
        return self.fused and not (training and self.synchronized) and self._fusable()

    def _create_variables(self, input_shape):
        c = input_shape[-1]
        if c is None:
            raise ValueError(f"{self}: the number of channels must be known, got {shape_str(input_shape)}")
        if self.scale:
            self.gamma = tf.Variable(tf.ones([c], self.dtype), name="gamma")
        if self.center:
            self.beta = tf.Variable(tf.zeros([c], self.dtype), name="beta")
        per_replica = {"trainable": False, "synchronization": tf.VariableSynchronization.ON_READ,
                       "aggregation": tf.VariableAggregation.MEAN}
        self.moving_mean = tf.Variable(tf.zeros([c], self.dtype), name="moving_mean", **per_replica)
        self.moving_variance = tf.Variable(tf.ones([c], self.dtype), name="moving_variance", **per_replica)

    def _forward(self, x, training):
        return self._normalized(x, training)[0]

    def _normalized(self, x, training):
        """(y, mean, variance) by the fused kernel where it applies, else by the formula's ops."""
        if self._runs_kernel(training):
            return self._fused(x, training)
        mean, variance = self._statistics(x, training)
        return self._normalize(x, mean, variance), mean, variance

    def _fused(self, x, training):
        """The formula as one kernel: y, batch mean, batch variance = FusedBatchNormV3(x, gamma, beta) (training,
        moving statistics updated) or y = FusedBatchNormV3(x, gamma, beta, moving_mean, moving_variance)
        (inference). The kernel returns the unbiased variance sum (x - mean)^2 / (n - 1), so it is multiplied by
        (n - 1) / n: the formula's biased variance, which the moving average gets. x may be 16-bit; the rest is in
        the variables' dtype. oneDNN's bfloat16 kernel covers channel counts in multiples of 16; for others it
        falls back to a reference kernel (measured 2.7x slower than the float32 formula), so such an x is cast to
        float32 for the kernel and y back (the float32 kernel with both casts measured 0.3-0.7x the formula), or,
        in training where the width allows, its pixels are grouped to a multiple of 16 channels (`_fused_grouped`,
        0.88-0.95 of the bfloat16 step with the casts)."""
        c = self.moving_mean.shape[0]
        dtype = self.moving_mean.dtype
        if self._runs_grouped(x.shape, x.dtype, training):
            return self._fused_grouped(x)
        if x.dtype != dtype and c % 16:
            y, mean, variance = self._fused(tf.cast(x, dtype), training)
            return tf.cast(y, x.dtype), mean, variance
        gamma = self.gamma if self.scale else tf.ones([c], dtype)
        beta = self.beta if self.center else tf.zeros([c], dtype)
        if training:
            y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=self.epsilon)
            n = tf.cast(tf.size(x) // c, dtype)
            variance = unbiased * ((n - 1.0) / n)
            self._move_statistics(mean, variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, mean, variance, epsilon=self.epsilon,
                                                       is_training=False)
        return y, mean, variance

    def _runs_grouped(self, shape, dtype, training):
        """Whether a call on an x of `shape` and `dtype` takes `_fused_grouped`: the fused kernel, in training (not
        synchronized), on a 16-bit x whose channels are not a multiple of 16 and whose width groups them."""
        c = self.moving_mean.shape[0]
        return (training and self._runs_kernel(training) and shape.rank == 4 and dtype != self.moving_mean.dtype
                and c % 16 != 0 and _pixels_per_group(c, shape[2]) is not None)

    def merges_relu(self, x, training):
        """Whether `call_with_relu(x)` applies: a call that runs grouped, whose ReLU the graph optimizer cannot merge
        into the kernel as it does elsewhere (FusedBatchNormV3 + Relu): the grouped view's reshape stands between."""
        return self.built and self._runs_grouped(x.shape, self.dtype, training)

    def call_with_relu(self, x):
        """relu(self(x, training=True)) as one grouped kernel call with the ReLU inside (`_fused_grouped`), where
        `merges_relu(x, True)`: the same values, one pass fewer each way (Sequential calls it for BatchNorm + ReLU)."""
        return self._fused_grouped(self._input(x), relu=True)[0]

    def _fused_grouped(self, x, relu=False):
        """Training on a 16-bit x [N, H, W, C] whose C is not a multiple of 16, by oneDNN's 16-bit kernel: x seen
        as [N, H, W/k, k*C] (the same memory; k neighbouring pixels' channels side by side, k*C a multiple of 16).
        The kernel's statistics are then per pixel phase p and channel; with n values in each phase,

            mean = mean_p(mean_p,c)        variance = mean_p(variance_p,c + (mean_p,c - mean)^2)

        (the variance of the k phases together). y is the kernel's inference call with these statistics (tiled
        k times), and the backward pass is the formula's, dx = (gamma / sigma) (dy - mean(dy) - x_hat mean(dy
        x_hat)): the kernel's inference gradient gives (gamma / sigma) dy, sum(dy) and sum(dy x_hat) per phase,
        and the rest, an affine function of x per channel, is one more inference call of the kernel. relu: y is
        relu(y), applied to the kernel's output (which the graph optimizer merges into it), and dy * [y > 0] the
        gradient that reaches the formula's."""
        c = self.moving_mean.shape[0]
        k = _pixels_per_group(c, x.shape[2])
        dtype = self.moving_mean.dtype
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([c], dtype)
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([c], dtype)
        grouped = tf.concat([tf.shape(x)[:2], [x.shape[2] // k, k * c]], axis=0)  # N and H may be unknown
        epsilon = self.epsilon

        def kernel(x, scale, offset, mean, variance):
            """The kernel in inference: scale (x - mean) / sqrt(variance + epsilon) + offset, every [C] tiled."""
            tiled = [tf.tile(t, [k]) for t in (scale, offset, mean, variance)]
            return tf.compat.v1.nn.fused_batch_norm(x, *tiled, epsilon=epsilon, is_training=False)[0]

        @tf.custom_gradient
        def normalize(x, gamma, beta):
            xg = tf.reshape(x, grouped)
            _, phase_mean, phase_unbiased = tf.compat.v1.nn.fused_batch_norm(
                xg, tf.ones([k * c], dtype), tf.zeros([k * c], dtype), epsilon=epsilon)
            n = tf.cast(tf.size(xg) // (k * c), dtype)
            phase_mean = tf.reshape(phase_mean, [k, c])
            phase_variance = tf.reshape(phase_unbiased * ((n - 1.0) / n), [k, c])
            mean = tf.reduce_mean(phase_mean, axis=0)
            variance = tf.reduce_mean(phase_variance + tf.square(phase_mean - mean), axis=0)
            y = kernel(xg, gamma, beta, mean, variance)
            if relu:
                y = tf.nn.relu(y)

            def backward(dy, d_mean, d_variance):
                dyg = tf.reshape(dy, grouped)
                if relu:
                    dyg = tf.raw_ops.ReluGrad(gradients=dyg, features=y)
                tiled = [tf.tile(t, [k]) for t in (gamma, mean, variance)]
                dx_direct, sum_dy_x_hat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                    y_backprop=dyg, x=xg, scale=tiled[0], reserve_space_1=tiled[1], reserve_space_2=tiled[2],
                    reserve_space_3=tf.zeros([0], dtype), epsilon=epsilon, is_training=False)
                d_gamma = tf.reduce_sum(tf.reshape(sum_dy_x_hat, [k, c]), axis=0)
                d_beta = tf.reduce_sum(tf.reshape(sum_dy, [k, c]), axis=0)
                inv_sigma = tf.math.rsqrt(variance + epsilon)
                count = n * k
                slope = -gamma * inv_sigma * inv_sigma * d_gamma / count          # dx = direct + slope x + shift
                shift = -gamma * inv_sigma * d_beta / count - slope * mean
                # slope * (x - 0) / sqrt((1 - epsilon) + epsilon) + shift: the divisor is 1 to float32 rounding
                rest = kernel(xg, slope, shift, tf.zeros([c], dtype), tf.fill([c], 1.0 - epsilon))
                return tf.reshape(dx_direct + rest, tf.shape(x)), d_gamma, d_beta

            return (tf.reshape(y, tf.shape(x)), mean, variance), backward

        y, mean, variance = normalize(x, gamma, beta)
        self._move_statistics(mean, variance)
        return y, mean, variance

    def _statistics(self, x, training):
        """(mean, variance) [C]: the batch's, moving statistics updated (training), or the moving ones."""
        if training:
            axes = list(range(len(x.shape) - 1))
            if self.synchronized:
                mean, variance = distribute.cross_replica_moments(x, axes)
            else:
                mean = tf.reduce_mean(x, axis=axes)
                # The gradient through `mean` inside the variance is exactly 0 (sum of x - mean is 0), so it
                # is stopped, as tf.nn.moments (which Keras uses) does.
                variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axis=axes)
            self._move_statistics(mean, variance)
            return mean, variance
        return self.moving_mean, self.moving_variance

    def _move_statistics(self, mean, variance):
        """moving_mean = moving_mean * momentum + mean * (1 - momentum), and the variance alike."""
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))

    def _normalize(self, x, mean, variance):
        """y = gamma * (x - mean) / sqrt(variance + epsilon) + beta, evaluated as Keras (tf.nn.batch_normalization)
        does: inv = gamma / sqrt(variance + epsilon); y = x * inv + (beta - mean * inv)."""
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * self.gamma
        offset = self.beta - mean * inv if self.center else -mean * inv
        return x * inv + offset

    def forward_with_cache(self, x, training=False):
        """y as the forward pass computes it (the fused kernel or the formula, as `_forward`); cache = (x_hat =
        (x - mean) / sigma, 1 / sigma [C], training), sigma = sqrt(variance + epsilon), for the backward pass."""
        y, mean, variance = self._normalized(x, training)
        inv_sigma = tf.math.rsqrt(variance + self.epsilon)
        return y, ((x - mean) * inv_sigma, inv_sigma, bool(training))

    def backward(self, dy, cache):
        """y = gamma * x_hat + beta, x_hat = (x - mean) / sigma; sums and means run over every axis but the last:
          dgamma[C] = sum dy * x_hat;   dbeta[C] = sum dy
          inference (mean, sigma constants):  dx = (gamma / sigma) * dy
          training (mean and sigma depend on every x of the batch):
              dx = (gamma / sigma) * (dy - mean(dy) - x_hat * mean(dy * x_hat))
          (the direct path, minus what flows back through the batch mean, minus what flows back through
          the batch variance). The moving statistics are left alone: only the forward pass updates them.
        """
        x_hat, inv_sigma, training = cache
        axes = list(range(len(dy.shape) - 1))
        grads = {}
        if self.scale:
            grads["gamma"] = tf.reduce_sum(dy * x_hat, axis=axes)
        if self.center:
            grads["beta"] = tf.reduce_sum(dy, axis=axes)
        scale = inv_sigma * self.gamma if self.scale else inv_sigma
        if not training:
            return scale * dy, grads
        return scale * (dy - tf.reduce_mean(dy, axis=axes) - x_hat * tf.reduce_mean(dy * x_hat, axis=axes)), grads

    def output_shape(self, input_shape=None):
        return self._shape_or_built(input_shape)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        c = input_shape[-1]
        y = f"(x{shape_str(input_shape)} - mean[{c}]) / sqrt(var[{c}] + {self.epsilon:g})"
        if self.scale:
            y = f"gamma[{c}] * {y}"
        if self.center:
            y += f" + beta[{c}]"
        return f"y = {y}"

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        c = input_shape[-1]
        x = shape_str(input_shape)
        gamma = f"(gamma[{c}] / sigma[{c}])" if self.scale else f"(1 / sigma[{c}])"
        parts = [f"x_hat{x} = (x - mean) / sigma"]
        if self.scale:
            parts.append(f"dgamma[{c}] = sum dy * x_hat")
        if self.center:
            parts.append(f"dbeta[{c}] = sum dy")
        parts.append(f"dx{x} = {gamma} * (dy - mean(dy) - x_hat * mean(dy * x_hat)) (training), "
                     f"{gamma} * dy (inference)")
        return "; ".join(parts)


class Dropout(Layer):
    """Inverted dropout: training y = x * mask / (1 - rate), mask ~ Bernoulli(1 - rate) per element;
    inference y = x.

    Kept units are scaled by 1 / (1 - rate) so E[y] = x and inference needs no rescaling. The mask comes from
    `self.generator` (a tf.random.Generator, checkpointed with the model so a resumed run draws the same
    masks); its seed is `seed`, or when seed is None it is drawn from the global-seeded random ops at
    construction, so `tf.random.set_seed` makes runs repeatable.
    """

    def __init__(self, rate, seed=None, name=None):
        super().__init__(name=name)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"{self}: rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)
        if seed is None:
            seed = int(tf.random.uniform([], minval=0, maxval=2**31 - 1, dtype=tf.int64))
        self.seed = seed
        self.generator = tf.random.Generator.from_seed(seed)

    def _forward(self, x, training):
        return self.forward_with_cache(x, training)[0]

    def forward_with_cache(self, x, training=False):
        """(y, mask): the mask drawn for this batch (training), None in inference."""
        if not training or self.rate == 0.0:
            return x, None
        keep = tf.cast(self.generator.uniform(tf.shape(x)) >= self.rate, x.dtype)
        return x * keep / (1.0 - self.rate), keep

    def backward(self, dy, mask):
        """dx = dy * mask / (1 - rate) with the forward pass's mask (training); dx = dy (inference)."""
        if mask is None:
            return dy, {}
        return dy * mask / (1.0 - self.rate), {}

    def output_shape(self, input_shape=None):
        return self._shape_or_built(input_shape)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (f"y = x{shape_str(input_shape)} * mask / {1.0 - self.rate:g}, "
                f"mask ~ Bernoulli({1.0 - self.rate:g}) (training); y = x (inference)")

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (f"dx{shape_str(input_shape)} = dy * mask / {1.0 - self.rate:g} (training, same mask); "
                f"dx = dy (inference)")


class Activation(Layer):
    """y = fn(x), elementwise (softmax: along the last axis); same shape as x. fused (default): fn's kernel
    where TensorFlow has one (activations.kernel: tf.nn.relu), else the formula. The formula also runs where the
    kernel would be merged into a slow one (`_merges_into_a_reference_kernel`)."""

    def __init__(self, fn_name, fused=True, name=None):
        super().__init__(name=name)
        self.fn = activations.get(fn_name)
        self.fused = bool(fused)

    @property
    def computes_in_float32(self):
        """softmax computes in float32 under mixed precision: its exponentials and their sum lose too much in 16
        bits (as the loss, which always computes in float32)."""
        return self.fn is activations.softmax

    def _forward(self, x, training):
        if self.fused and not (training and _merges_into_a_reference_kernel(self.fn, x)):
            return activations.kernel(self.fn)(x)
        return self.fn(x)

    def backward(self, dy, cache):
        """dx = dy * fn'(x), written with y = fn(x) (activations.backward): relu dy * [y > 0], sigmoid
        dy * y * (1 - y), tanh dy * (1 - y^2), softmax y * (dy - sum_k dy * y)."""
        x, y = cache
        return activations.backward(self.fn, dy, y), {}

    def output_shape(self, input_shape=None):
        return self._shape_or_built(input_shape)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"y = {activations.name_of(self.fn) or 'identity'}(x{shape_str(input_shape)})"

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"dx{shape_str(input_shape)} = {activations.backward_formula(self.fn)}"


def _merges_into_a_reference_kernel(fn, x):
    """Whether tf.nn.relu on x, in a graph, would be merged by TensorFlow's graph optimizer with the training
    FusedBatchNormV3 that computes x into one oneDNN kernel that is its reference implementation: x float32 with a
    channel count that is not a multiple of 8, which oneDNN's JIT batch-norm kernels need once a relu is fused
    into them. Measured on conv_bn's first BatchNorm, [64, 28, 28, 12]: the merged kernel 2.1 ms, the batch norm
    alone 0.4 ms, and the formula's relu (one compare, one multiply) keeps the two apart; the whole training step
    9% faster (benchmarks/RESULTS.md). In inference, and for other channel counts, the merged kernel is a JIT one.
    """
    return (fn is activations.relu and not tf.executing_eagerly() and x.dtype == tf.float32
            and x.op.type == "FusedBatchNormV3" and x.op.get_attr("is_training") and x.shape[-1] % 8 != 0)


class Reshape(Layer):
    """y = reshape(x, [N] + shape): x [N, ...] -> y [N, *shape]; one entry of `shape` may be -1 (inferred)."""

    def __init__(self, shape, name=None):
        super().__init__(name=name)
        shape = tuple(shape)
        if not shape or not all(isinstance(d, int) and (d > 0 or d == -1) for d in shape) or shape.count(-1) > 1:
            raise ValueError(f"{self}: shape must be positive ints with at most one -1, got {shape!r}")
        self.shape = shape

    def _create_variables(self, input_shape):
        self.output_shape(input_shape)

    def _forward(self, x, training):
        return tf.reshape(x, (tf.shape(x)[0],) + self.output_shape()[1:])

    def backward(self, dy, cache):
        """dx = reshape(dy, shape of x): reshaping moves no value, so each gradient goes back to its place."""
        x, y = cache
        return tf.reshape(dy, tf.shape(x)), {}

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        if any(d is None for d in input_shape[1:]):
            raise ValueError(f"{self}: every non-batch dimension must be known, got {shape_str(input_shape)}")
        size = math.prod(input_shape[1:])
        known = math.prod(d for d in self.shape if d != -1)
        if -1 in self.shape:
            if size % known:
                raise ValueError(f"{self}: cannot reshape {shape_str(input_shape)} to {shape_str((None,) + self.shape)}")
            return (None,) + tuple(size // known if d == -1 else d for d in self.shape)
        if size != known:
            raise ValueError(f"{self}: cannot reshape {shape_str(input_shape)} ({size} values per example) "
                             f"to {shape_str((None,) + self.shape)} ({known} values)")
        return (None,) + self.shape

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"y = reshape(x{shape_str(input_shape)}, {shape_str(self.output_shape(input_shape))})"

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"dx = reshape(dy{shape_str(self.output_shape(input_shape))}, {shape_str(input_shape)})"


class Flatten(Reshape):
    """y = reshape(x, [N, d1 * d2 * ...]): x [N, d1, d2, ...] -> y [N, prod(d)] (row-major, as Keras);
    Reshape((-1,))."""

    def __init__(self, name=None):
        super().__init__((-1,), name=name)


class MaxPool2D(Windowed):
    """Max pooling: y[n, i, j, c] = max_{di < ph, dj < pw} x_pad[n, i*sh + di, j*sw + dj, c].

    x [N, H, W, C] -> y [N, H', W', C]; strides default to the pool size; H', W' and the padding as in Conv2D
    (`Windowed`; padded positions never win the max).
    """

    def __init__(self, pool_size=2, strides=None, padding="valid", name=None):
        super().__init__(pool_size, strides, padding, window_name="pool_size", name=name)

    @property
    def pool_size(self):
        return self.window

    def _forward(self, x, training):
        return tf.nn.max_pool2d(x, self.pool_size, *self._tf_strides())

    def forward_with_cache(self, x, training=False):
        """(y, (shape of x, argmax)): argmax[n, i, j, c] = the flat index into x of the window's maximum."""
        strides, padding = self._tf_strides()
        y, argmax = tf.nn.max_pool_with_argmax(x, self.pool_size, strides, padding, include_batch_in_index=True)
        return y, (tf.shape(x), argmax)

    def backward(self, dy, cache):
        """dx[p] = sum of dy[n, i, j, c] over the windows whose maximum sits at position p of x, 0 elsewhere:
        the max passes on the gradient of whichever input won, so every other input gets none (and an input
        winning two overlapping windows gets both)."""
        shape, argmax = cache
        size = tf.cast(tf.reduce_prod(shape), tf.int64)
        routed = tf.scatter_nd(tf.reshape(argmax, [-1, 1]), tf.reshape(dy, [-1]), tf.reshape(size, [1]))
        return tf.reshape(routed, shape), {}

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        ph, pw = self.pool_size
        return f"y = max over {ph}x{pw} windows of x{shape_str(input_shape)}, {self._window_text()}"

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (f"dx{shape_str(input_shape)} = dy{shape_str(self.output_shape(input_shape))} routed to each "
                f"window's max, 0 elsewhere")


class GlobalAveragePooling2D(Layer):
    """y[n, c] = mean_{i, j} x[n, i, j, c]: x [N, H, W, C] -> y [N, C] (a weight-free classification head)."""

    input_rank = 4

    def _forward(self, x, training):
        return tf.reduce_mean(x, axis=[1, 2])

    def backward(self, dy, cache):
        """dx[n, i, j, c] = dy[n, c] / (H * W): every position contributed 1 / (H * W) of the mean."""
        x, y = cache
        shape = tf.shape(x)
        return tf.broadcast_to(dy[:, tf.newaxis, tf.newaxis, :], shape) / tf.cast(shape[1] * shape[2], dy.dtype), {}

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (None, input_shape[-1])

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"y = mean over H,W of x{shape_str(input_shape)}"

    def backward_formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"dx{shape_str(input_shape)} = dy[N,{input_shape[-1]}] / (H * W) at every position"


def _count(variables):
    return sum(int(v.shape.num_elements()) for v in variables)


class Sequential(tf.Module):
    """logits = layer_L(... layer_2(layer_1(x))): the layers applied in order with one `training` flag.

    `build((None, 28, 28, 1))` builds every layer in order (each from the previous one's output shape), in
    float32 or the given dtype; calling an unbuilt model builds it from the input's shape and dtype.
    `predict(x)` = softmax(logits). `named_variables()` names every variable "layer/variable".
    """

    def __init__(self, layers, name=None):
        super().__init__(name=name or "sequential")
        self.layers = list(layers)
        if not self.layers:
            raise ValueError(f"Sequential '{self.name}': needs at least one layer")
        for layer in self.layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"Sequential '{self.name}': {layer!r} is not a core.module.Layer")
        self.layer_names = self._unique_names()
        self.input_shape = None
        self.built = False

    def _unique_names(self):
        names, seen = [], {}
        for layer in self.layers:
            base = layer.name
            count = seen.get(base, 0)
            seen[base] = count + 1
            names.append(base if count == 0 else f"{base}_{count}")
        return names

    def build(self, input_shape, dtype=tf.float32):
        """Builds every layer for inputs of `input_shape`, e.g. (None, 28, 28, 1), in `dtype`; idempotent."""
        input_shape = batch_shape(input_shape)
        if self.built:
            self.layers[0].build(input_shape)
            return
        shape = input_shape
        for layer in self.layers:
            layer.build(shape, dtype)
            shape = layer.output_shape(shape)
        self.input_shape = input_shape
        self.built = True

    def __call__(self, x, training=False):
        """x [N, ...] -> logits [N, classes]. In training, a BatchNorm and the fused ReLU after it run as one call
        where the BatchNorm groups pixels (`BatchNorm.merges_relu`): the same values, merged as TensorFlow's graph
        optimizer merges every other BatchNorm + ReLU pair."""
        x = self._built_for(x)
        merged = False
        for layer, following in zip(self.layers, self.layers[1:] + [None]):
            if merged:
                merged = False
            elif (training and isinstance(layer, BatchNorm) and isinstance(following, Activation)
                  and following.fused and following.fn is activations.relu and layer.merges_relu(x, training)):
                x, merged = layer.call_with_relu(x), True
            else:
                x = layer(x, training=training)
        return x

    def activations(self, x, training=False):
        """[(layer name, layer output)] for every layer in order (for activation histograms)."""
        x = self._built_for(x)
        outputs = []
        for name, layer in zip(self.layer_names, self.layers):
            x = layer(x, training=training)
            outputs.append((name, x))
        return outputs

    def _built_for(self, x):
        """x as a tensor, the model built from its shape and (floating) dtype on the first call."""
        x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
        if not self.built:
            self.build(x.shape, x.dtype if x.dtype.is_floating else tf.float32)
        return x

    def named_variables(self):
        """[("layer/variable", variable)] for every variable, e.g. ("conv1/w", ...), ("conv1_bn/moving_mean", ...),
        with the unique layer names of the summary and the attribute path inside each layer (lists and nested
        modules included: "block/convs/0/w"). The one source of readable names for the trainer and summaries."""
        return [named for name, layer in zip(self.layer_names, self.layers) for named in layer.named_variables(name)]

    def predict(self, x):
        """Class probabilities [N, classes] = softmax(logits) in inference mode."""
        return activations.softmax(self(x, training=False))

    def count_params(self):
        """(total, trainable, non_trainable) parameter counts, as Keras's model.summary() reports them."""
        if not self.built:
            raise ValueError(f"Sequential '{self.name}' is not built: call build(input_shape) first")
        trainable = _count(self.trainable_variables)
        total = _count(self.variables)
        return total, trainable, total - trainable

    def summary(self, print_fn=print):
        """One row per layer (name, output shape, parameters, formula), then the totals; returns the text."""
        if not self.built:
            raise ValueError(f"Sequential '{self.name}' is not built: call build(input_shape) first")
        rows = [("Layer", "Output shape", "Params", "Formula")]
        shape = self.input_shape
        for name, layer in zip(self.layer_names, self.layers):
            out = layer.output_shape(shape)
            rows.append((f"{name} ({type(layer).__name__})", shape_str(out), f"{_count(layer.variables):,}",
                         layer.formula(shape)))
            shape = out
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f'Model: "{self.name}", input {shape_str(self.input_shape)}']
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
        total, trainable, non_trainable = self.count_params()
        lines += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {non_trainable:,}"]
        for line in lines:
            print_fn(line)
        return "\n".join(lines)
