"""Layers written by hand as tf.Modules, each computing exactly what the Keras layer of the same name computes.

Shapes use N for the batch dimension. Images are NHWC: [N, height, width, channels].
Variables are created by `build(input_shape)`, either explicitly or lazily on the first call; a built layer
never creates variables again, so a model built eagerly can be traced by `tf.function` any number of times.
Layers return logits (no softmax); `Sequential.predict` applies the softmax.
"""
import math

import tensorflow as tf

from core import activations, initializers


def _shape_str(shape):
    """(None, 28, 28, 1) -> "[N,28,28,1]" (an unknown non-batch dimension prints as "?")."""
    dims = ["N" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(shape)]
    return "[" + ",".join(dims) + "]"


def _batch_shape(shape):
    """Any shape-like -> tuple with the batch dimension as None."""
    dims = tf.TensorShape(shape).as_list()
    if not dims:
        return ()
    return (None,) + tuple(dims[1:])


def _pair(value, what, layer):
    """2 -> (2, 2); (2, 3) -> (2, 3); anything else is a ValueError."""
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{layer}: {what} must be a positive int or a pair of positive ints, got {value!r}")
    return value


def _padding(padding, layer):
    if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
        raise ValueError(f"{layer}: unknown padding {padding!r}; expected 'same' or 'valid'")
    return padding.lower()


def _check_kernel_init(kernel_init, layer):
    if kernel_init not in initializers.KERNEL_INITIALIZERS:
        raise ValueError(f"{layer}: unknown kernel_init {kernel_init!r}; "
                         f"expected one of {initializers.KERNEL_INITIALIZERS}")


def _spatial_out(input_shape, window, strides, padding):
    """(H', W') for x [N, H, W, C]: same -> ceil(H / sh); valid -> ceil((H - kh + 1) / sh); likewise W."""
    out = []
    for size, k, s in zip(input_shape[1:3], window, strides):
        if size is not None:
            size = -(-(size if padding == "same" else size - k + 1) // s)
        out.append(size)
    return tuple(out)


def _activated(fn, z):
    """The formula "y = fn(z)", or "y = z" when fn is the identity."""
    name = activations.name_of(fn)
    return f"y = {name}({z})" if name else f"y = {z}"


def _check_spatial(layer, input_shape, window, padding):
    if padding == "valid":
        for size, k in zip(input_shape[1:3], window):
            if size is not None and size < k:
                raise ValueError(f"{layer}: input {_shape_str(input_shape)} is smaller than the "
                                 f"{window[0]}x{window[1]} window with 'valid' padding")


class Layer(tf.Module):
    """Base class: y = f(x; variables). Subclasses define `_create_variables`, `_forward`, `output_shape`, `formula`.

    `input_rank` is the rank the layer accepts (None: any rank >= 2).
    """

    input_rank = None

    def __init__(self, name=None):
        super().__init__(name=name or self._default_name())
        self.built = False
        self.input_shape = None

    @classmethod
    def _default_name(cls):
        out = []
        for i, c in enumerate(cls.__name__):
            if c.isupper() and i > 0 and not cls.__name__[i - 1].isupper() and not cls.__name__[i - 1].isdigit():
                out.append("_")
            out.append(c.lower())
        return "".join(out)

    def __str__(self):
        return f"{type(self).__name__} '{self.name}'"

    def __call__(self, x, training=False):
        """y = layer(x); `training` is a Python bool (batch statistics and dropout masks when True)."""
        if tf.is_tensor(training):
            raise ValueError(f"{self}: training must be a Python bool (trace one tf.function per mode), "
                             f"got a tensor {training!r}")
        training = bool(training)
        x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
        if x.dtype != tf.float32:
            x = tf.cast(x, tf.float32)
        if not self.built:
            self.build(x.shape)
        else:
            self._check_input_shape(_batch_shape(x.shape))
        return self._forward(x, training)

    def build(self, input_shape):
        """Creates the variables for inputs of `input_shape` (batch dimension ignored); idempotent."""
        input_shape = _batch_shape(input_shape)
        if self.built:
            self._check_input_shape(input_shape)
            return
        self._check_rank(input_shape)
        with self.name_scope:
            self._create_variables(input_shape)
        self.input_shape = input_shape
        self.built = True

    def _check_rank(self, input_shape):
        rank = len(input_shape)
        if self.input_rank is None:
            if rank < 2:
                raise ValueError(f"{self}: expected an input with a batch dimension (rank >= 2), "
                                 f"got shape {_shape_str(input_shape)}")
        elif rank != self.input_rank:
            expected = {2: "2 [N,features]", 4: "4 [N,height,width,channels]"}.get(self.input_rank, self.input_rank)
            raise ValueError(f"{self}: expected input of rank {expected}, "
                             f"got shape {_shape_str(input_shape)} (rank {rank})")

    def _check_input_shape(self, input_shape):
        built = self.input_shape
        compatible = len(input_shape) == len(built) and all(
            a is None or b is None or a == b for a, b in zip(input_shape[1:], built[1:]))
        if not compatible:
            raise ValueError(f"{self} was built for input {_shape_str(built)} but got {_shape_str(input_shape)}")

    def _create_variables(self, input_shape):
        """Layers without variables create nothing."""

    def _forward(self, x, training):
        raise NotImplementedError

    def output_shape(self, input_shape=None):
        """Output shape for `input_shape` (default: the built one), batch dimension as None."""
        raise NotImplementedError

    def formula(self, input_shape=None):
        """The layer's equation with shapes, e.g. "y = relu(x[N,3136] @ w[3136,200] + b[200])"."""
        raise NotImplementedError

    def _shape_or_built(self, input_shape):
        if input_shape is None:
            if self.input_shape is None:
                raise ValueError(f"{self} is not built: pass input_shape or call build(input_shape) first")
            return self.input_shape
        return _batch_shape(input_shape)


class Dense(Layer):
    """Fully connected layer: y = activation(x @ w + b).

    x [N, in], w [in, units], b [units] -> y [N, units].
    w: Glorot uniform (fan_in = in, fan_out = units) or truncated normal (stddev 0.1); b: constant bias_init.
    """

    input_rank = 2

    def __init__(self, units, activation=None, use_bias=True, kernel_init="glorot_uniform", bias_init=0.0,
                 name=None):
        super().__init__(name=name)
        if not isinstance(units, int) or units <= 0:
            raise ValueError(f"{self}: units must be a positive int, got {units!r}")
        _check_kernel_init(kernel_init, self)
        self.units = units
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.kernel_init = kernel_init
        self.bias_init = float(bias_init)

    def _create_variables(self, input_shape):
        n_in = input_shape[-1]
        if n_in is None:
            raise ValueError(f"{self}: the input size must be known to build, got {_shape_str(input_shape)}")
        self.w = tf.Variable(initializers.kernel(self.kernel_init, [n_in, self.units], n_in, self.units), name="w")
        if self.use_bias:
            self.b = tf.Variable(initializers.constant([self.units], self.bias_init), name="b")

    def _forward(self, x, training):
        y = tf.matmul(x, self.w)
        if self.use_bias:
            y = y + self.b
        return self.activation(y)

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return input_shape[:-1] + (self.units,)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        n_in = input_shape[-1]
        z = f"x{_shape_str(input_shape)} @ w[{n_in},{self.units}]"
        if self.use_bias:
            z += f" + b[{self.units}]"
        return _activated(self.activation, z)


class Conv2D(Layer):
    """2-D convolution: y = activation(conv2d(x, w, stride, padding) + b).

    x [N, H, W, in], w [kh, kw, in, filters] (HWIO), b [filters] -> y [N, H', W', filters] with
    y[n, i, j, f] = sum_{di, dj, c} x_pad[n, i*sh + di, j*sw + dj, c] * w[di, dj, c, f] + b[f].
    padding "valid": no padding, H' = ceil((H - kh + 1) / sh).
    padding "same": H' = ceil(H / sh); the total padding P = max((H' - 1) * sh + kh - H, 0) is split
    top = P // 2, bottom = P - top, so an odd P puts the extra row at the bottom (and column at the right),
    exactly as TensorFlow and Keras do.
    w: Glorot uniform with fan_in = kh*kw*in, fan_out = kh*kw*filters (or truncated normal); b: constant.
    """

    input_rank = 4

    def __init__(self, filters, kernel_size, strides=1, padding="same", activation=None, use_bias=True,
                 kernel_init="glorot_uniform", bias_init=0.0, name=None):
        super().__init__(name=name)
        if not isinstance(filters, int) or filters <= 0:
            raise ValueError(f"{self}: filters must be a positive int, got {filters!r}")
        _check_kernel_init(kernel_init, self)
        self.filters = filters
        self.kernel_size = _pair(kernel_size, "kernel_size", self)
        self.strides = _pair(strides, "strides", self)
        self.padding = _padding(padding, self)
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.kernel_init = kernel_init
        self.bias_init = float(bias_init)

    def _create_variables(self, input_shape):
        n_in = input_shape[-1]
        if n_in is None:
            raise ValueError(f"{self}: the number of input channels must be known, got {_shape_str(input_shape)}")
        _check_spatial(self, input_shape, self.kernel_size, self.padding)
        kh, kw = self.kernel_size
        shape = [kh, kw, n_in, self.filters]
        self.w = tf.Variable(initializers.kernel(self.kernel_init, shape, kh * kw * n_in, kh * kw * self.filters),
                             name="w")
        if self.use_bias:
            self.b = tf.Variable(initializers.constant([self.filters], self.bias_init), name="b")

    def _forward(self, x, training):
        y = tf.nn.conv2d(x, self.w, strides=(1,) + self.strides + (1,), padding=self.padding.upper())
        if self.use_bias:
            y = y + self.b
        return self.activation(y)

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (None,) + _spatial_out(input_shape, self.kernel_size, self.strides, self.padding) + (self.filters,)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        kh, kw = self.kernel_size
        stride = self.strides[0] if self.strides[0] == self.strides[1] else f"{self.strides[0]}x{self.strides[1]}"
        z = (f"conv2d(x{_shape_str(input_shape)}, w[{kh},{kw},{input_shape[-1]},{self.filters}], "
             f"stride {stride}, {self.padding})")
        if self.use_bias:
            z += f" + b[{self.filters}]"
        return _activated(self.activation, z)


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
    """

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True, name=None):
        super().__init__(name=name)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{self}: momentum must be in [0, 1], got {momentum!r}")
        if epsilon <= 0:
            raise ValueError(f"{self}: epsilon must be > 0, got {epsilon!r}")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale

    def _create_variables(self, input_shape):
        c = input_shape[-1]
        if c is None:
            raise ValueError(f"{self}: the number of channels must be known, got {_shape_str(input_shape)}")
        if self.scale:
            self.gamma = tf.Variable(tf.ones([c]), name="gamma")
        if self.center:
            self.beta = tf.Variable(tf.zeros([c]), name="beta")
        self.moving_mean = tf.Variable(tf.zeros([c]), trainable=False, name="moving_mean")
        self.moving_variance = tf.Variable(tf.ones([c]), trainable=False, name="moving_variance")

    def _forward(self, x, training):
        if training:
            axes = list(range(len(x.shape) - 1))
            mean = tf.reduce_mean(x, axis=axes)
            # The gradient through `mean` inside the variance is exactly 0 (sum of x - mean is 0), so it is
            # stopped, as tf.nn.moments (which Keras uses) does.
            variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axis=axes)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return self._normalize(x, mean, variance)

    def _normalize(self, x, mean, variance):
        """y = gamma * (x - mean) / sqrt(variance + epsilon) + beta, evaluated as Keras (tf.nn.batch_normalization)
        does: inv = gamma / sqrt(variance + epsilon); y = x * inv + (beta - mean * inv)."""
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * self.gamma
        offset = self.beta - mean * inv if self.center else -mean * inv
        return x * inv + offset

    def output_shape(self, input_shape=None):
        return self._shape_or_built(input_shape)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        c = input_shape[-1]
        y = f"(x{_shape_str(input_shape)} - mean[{c}]) / sqrt(var[{c}] + {self.epsilon:g})"
        if self.scale:
            y = f"gamma[{c}] * {y}"
        if self.center:
            y += f" + beta[{c}]"
        return f"y = {y}"


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
        if not training or self.rate == 0.0:
            return x
        keep = tf.cast(self.generator.uniform(tf.shape(x)) >= self.rate, x.dtype)
        return x * keep / (1.0 - self.rate)

    def output_shape(self, input_shape=None):
        return self._shape_or_built(input_shape)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (f"y = x{_shape_str(input_shape)} * mask / {1.0 - self.rate:g}, "
                f"mask ~ Bernoulli({1.0 - self.rate:g}) (training); y = x (inference)")


class Activation(Layer):
    """y = fn(x), elementwise (softmax: along the last axis); same shape as x."""

    def __init__(self, fn_name, name=None):
        super().__init__(name=name)
        self.fn = activations.get(fn_name)

    def _forward(self, x, training):
        return self.fn(x)

    def output_shape(self, input_shape=None):
        return self._shape_or_built(input_shape)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"y = {activations.name_of(self.fn) or 'identity'}(x{_shape_str(input_shape)})"


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

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        if any(d is None for d in input_shape[1:]):
            raise ValueError(f"{self}: every non-batch dimension must be known, got {_shape_str(input_shape)}")
        size = math.prod(input_shape[1:])
        known = math.prod(d for d in self.shape if d != -1)
        if -1 in self.shape:
            if size % known:
                raise ValueError(f"{self}: cannot reshape {_shape_str(input_shape)} to {_shape_str((None,) + self.shape)}")
            return (None,) + tuple(size // known if d == -1 else d for d in self.shape)
        if size != known:
            raise ValueError(f"{self}: cannot reshape {_shape_str(input_shape)} ({size} values per example) "
                             f"to {_shape_str((None,) + self.shape)} ({known} values)")
        return (None,) + self.shape

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"y = reshape(x{_shape_str(input_shape)}, {_shape_str(self.output_shape(input_shape))})"


class Flatten(Reshape):
    """y = reshape(x, [N, d1 * d2 * ...]): x [N, d1, d2, ...] -> y [N, prod(d)] (row-major, as Keras);
    Reshape((-1,))."""

    def __init__(self, name=None):
        super().__init__((-1,), name=name)


class MaxPool2D(Layer):
    """Max pooling: y[n, i, j, c] = max_{di < ph, dj < pw} x[n, i*sh + di, j*sw + dj, c].

    x [N, H, W, C] -> y [N, H', W', C]; strides default to the pool size; padding as in Conv2D
    (padded positions never win the max).
    """

    input_rank = 4

    def __init__(self, pool_size=2, strides=None, padding="valid", name=None):
        super().__init__(name=name)
        self.pool_size = _pair(pool_size, "pool_size", self)
        self.strides = self.pool_size if strides is None else _pair(strides, "strides", self)
        self.padding = _padding(padding, self)

    def _create_variables(self, input_shape):
        _check_spatial(self, input_shape, self.pool_size, self.padding)

    def _forward(self, x, training):
        return tf.nn.max_pool2d(x, ksize=self.pool_size, strides=self.strides, padding=self.padding.upper())

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (None,) + _spatial_out(input_shape, self.pool_size, self.strides, self.padding) + (input_shape[-1],)

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        ph, pw = self.pool_size
        return (f"y = max over {ph}x{pw} windows of x{_shape_str(input_shape)}, "
                f"stride {self.strides[0]}, {self.padding}")


class GlobalAveragePooling2D(Layer):
    """y[n, c] = mean_{i, j} x[n, i, j, c]: x [N, H, W, C] -> y [N, C] (a weight-free classification head)."""

    input_rank = 4

    def _forward(self, x, training):
        return tf.reduce_mean(x, axis=[1, 2])

    def output_shape(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return (None, input_shape[-1])

    def formula(self, input_shape=None):
        input_shape = self._shape_or_built(input_shape)
        return f"y = mean over H,W of x{_shape_str(input_shape)}"


def _count(variables):
    return sum(int(v.shape.num_elements()) for v in variables)


class Sequential(tf.Module):
    """logits = layer_L(... layer_2(layer_1(x))): the layers applied in order with one `training` flag.

    `build((None, 28, 28, 1))` builds every layer in order (each from the previous one's output shape);
    calling an unbuilt model builds it from the input's shape. `predict(x)` = softmax(logits).
    """

    def __init__(self, layers, name=None):
        super().__init__(name=name or "sequential")
        self.layers = list(layers)
        if not self.layers:
            raise ValueError(f"Sequential '{self.name}': needs at least one layer")
        for layer in self.layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"Sequential '{self.name}': {layer!r} is not a core.layers.Layer")
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

    def build(self, input_shape):
        """Builds every layer for inputs of `input_shape`, e.g. (None, 28, 28, 1); idempotent."""
        input_shape = _batch_shape(input_shape)
        if self.built:
            self.layers[0].build(input_shape)
            return
        shape = input_shape
        for layer in self.layers:
            layer.build(shape)
            shape = layer.output_shape(shape)
        self.input_shape = input_shape
        self.built = True

    def __call__(self, x, training=False):
        """x [N, ...] -> logits [N, classes]."""
        return self.activations(x, training=training)[-1][1]

    def activations(self, x, training=False):
        """[(layer name, layer output)] for every layer in order (for activation histograms)."""
        x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
        if not self.built:
            self.build(x.shape)
        outputs = []
        for name, layer in zip(self.layer_names, self.layers):
            x = layer(x, training=training)
            outputs.append((name, x))
        return outputs

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
            rows.append((f"{name} ({type(layer).__name__})", _shape_str(out), f"{_count(layer.variables):,}",
                         layer.formula(shape)))
            shape = out
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f'Model: "{self.name}", input {_shape_str(self.input_shape)}']
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
        total, trainable, non_trainable = self.count_params()
        lines += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {non_trainable:,}"]
        for line in lines:
            print_fn(line)
        return "\n".join(lines)
