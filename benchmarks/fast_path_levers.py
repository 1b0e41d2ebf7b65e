"""The fast-path levers as variants of our model and optimizer, for bench_levers.py and bench_vs_keras.py: each
changes one thing in a copy of the step, so the two can be timed against each other in one process. Both build
their steps with `lever_runner` (bench_levers.py's docstring says what each lever changes)."""

STEP_LEVERS = ("guard", "metrics", "xla")
FAST_PATH_LEVERS = ("formulas", "formula_bn", "formula_relu_bias", "relu_after_bn", "relu_kernel_after_bn",
                    "bfloat16", "bfloat16_formulas", "bfloat16_relu_after_bn", "adam_compiled", "adam_op", "s2d",
                    "backward_data_kernel", "bfloat16_backward_data_kernel", "bfloat16_float32_first_layer",
                    "bfloat16_padded_batch_norm", "bfloat16_batch_norm_between_casts",
                    "bfloat16_batch_norm_relu_apart", "float32_grouped_batch_norm")


def lever_runner(tf, name, lever=None, precision="float32", jit_compile=False, seed=1):
    """A Runner of model `name` (built for 28x28x1 images; its codelab dropout, optimizer and learning rate) with
    `lever` applied: one of STEP_LEVERS or FAST_PATH_LEVERS, or None for the default step. A lever named
    bfloat16_* runs under mixed_bfloat16, xla with jit_compile, whatever `precision` and `jit_compile` say."""
    from core import optimizers
    from core.layers import BatchNorm
    from core.runner import Runner
    from models import REGISTRY

    if lever is not None and lever not in STEP_LEVERS + FAST_PATH_LEVERS:
        raise ValueError(f"unknown lever {lever!r}: choose from {', '.join(STEP_LEVERS + FAST_PATH_LEVERS)}")
    defaults = REGISTRY[name].defaults
    tf.random.set_seed(seed)
    model = REGISTRY[name].build(defaults["dropout"])
    model.build((None, 28, 28, 1))
    on_formulas(model, lever)
    if lever == "s2d":
        for layer in model.layers:
            if getattr(layer, "kernel_size", None) == (6, 6) and layer.strides == (2, 2):
                layer._forward = space_to_depth_forward(tf, layer)
    if lever == "bfloat16_float32_first_layer":
        float32_first_layer(model)
    for layer in model.layers:
        if not isinstance(layer, BatchNorm):
            continue
        if lever in ("bfloat16_padded_batch_norm", "bfloat16_batch_norm_between_casts",
                     "bfloat16_batch_norm_relu_apart"):
            layer.merges_relu = lambda x, training: False  # the BatchNorm and its ReLU called apart
        if lever == "bfloat16_padded_batch_norm":
            layer._fused = padded_batch_norm(tf, layer)
        if lever == "float32_grouped_batch_norm":
            layer._runs_grouped = grouped_in_float32(layer)
        if lever == "bfloat16_batch_norm_between_casts":
            layer._fused = batch_norm_between_casts(tf, layer)
    optimizer = {"adam": lambda rate: make_adam(lever, rate), "sgd": optimizers.SGD}[
        defaults["optimizer"]](defaults["learning_rate"])
    runner = Runner(model, optimizer, jit_compile=jit_compile or lever == "xla",
                    precision="mixed_bfloat16" if (lever or "").startswith("bfloat16") else precision)
    if lever == "guard":
        runner.step = lambda batch: _unguarded(runner, batch)
    if lever == "metrics":
        for metric in (runner.train_loss, runner.train_accuracy, runner.window_loss, runner.window_accuracy):
            metric.update = lambda *args, **kwargs: None
    return runner


def _unguarded(runner, batch):
    """The step without any finiteness check: gradients applied as they are."""
    import tensorflow as tf
    images, labels = batch
    loss, logits, gradients = runner.compute_gradients(runner.model, runner.loss_fn, images, labels,
                                                       runner.trainable)
    runner.optimizer.apply(gradients, runner.trainable)
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    for mean_loss, accuracy in ((runner.train_loss, runner.train_accuracy),
                                (runner.window_loss, runner.window_accuracy)):
        mean_loss.update(loss, weight=count)
        accuracy.update(labels, logits)
    return tf.constant(True)


def make_adam(lever, learning_rate):
    """The lever's Adam: one tf.raw_ops.ResourceApplyAdam per variable (adam_op), its float32 updates as one
    XLA-compiled function (adam_compiled: Adam(fused=True)), else the default (the formula op by op)."""
    from core import optimizers

    if lever == "adam_op":
        return AdamOp(learning_rate)
    return optimizers.Adam(learning_rate, fused=lever == "adam_compiled")


def on_formulas(model, lever):
    """Puts the layers that `lever` names on their formulas (fused=False); relu_kernel_after_bn: every ReLU that
    follows a BatchNorm as tf.nn.relu, merged into the BatchNorm's kernel whatever its channel count;
    backward_data_kernel: every Conv2D's input gradient by TensorFlow's Conv2DBackpropInput (core/subpixel.py off)."""
    import tensorflow as tf
    from core.layers import Activation, BatchNorm, Conv2D, Dense

    previous = None
    for layer in model.layers:
        if isinstance(layer, Activation) and isinstance(previous, BatchNorm) and lever == "relu_kernel_after_bn":
            layer._forward = lambda x, training: tf.nn.relu(x)
            formula = None
        elif isinstance(layer, BatchNorm):
            formula = lever in ("formulas", "formula_bn", "bfloat16_formulas")
        elif isinstance(layer, Activation) and isinstance(previous, BatchNorm) and lever in ("relu_after_bn",
                                                                                              "bfloat16_relu_after_bn"):
            formula = True
        elif isinstance(layer, (Activation, Conv2D, Dense)):
            formula = lever in ("formulas", "formula_relu_bias", "bfloat16_formulas")
        else:
            formula = None
        previous = layer
        if formula is not None:
            layer.fused = not formula
        if isinstance(layer, Conv2D) and lever in ("backward_data_kernel", "bfloat16_backward_data_kernel"):
            layer._linear = lambda x, layer=layer: tf.nn.conv2d(x, layer.w, *layer._tf_strides())


def space_to_depth_forward(tf, layer):
    """The layer's forward pass with its 6x6 stride-2 'same' convolution computed exactly as a 3x3 stride-1 'valid'
    convolution over space_to_depth(x_pad, 2) (4x the channels): x_pad[2i + 2a + b] = s2d(x_pad)[i + a, b], so
    w'[a1, a2, (b1, b2, c), f] = w[2 a1 + b1, 2 a2 + b2, c, f]."""
    from core.layers import _bias_activation

    def forward(x, training):
        height, width, channels = x.shape[1], x.shape[2], x.shape[3]
        pads = []
        for size in (height, width):
            total = max((-(-size // 2) - 1) * 2 + 6 - size, 0)
            pads.append([total // 2, total - total // 2 + (size + total) % 2])  # even size for space_to_depth
        x_pad = tf.pad(x, [[0, 0], pads[0], pads[1], [0, 0]])
        w = tf.reshape(tf.transpose(tf.reshape(layer.w, [3, 2, 3, 2, channels, layer.filters]), [0, 2, 1, 3, 4, 5]),
                       [3, 3, 4 * channels, layer.filters])
        z = tf.nn.conv2d(tf.nn.space_to_depth(x_pad, 2), w, strides=1, padding="VALID")
        return _bias_activation(layer, z[:, :-(-height // 2), :-(-width // 2), :])

    return forward


def float32_first_layer(model):
    """Under mixed_bfloat16: the first convolution (one input channel, where oneDNN's bfloat16 kernel took twice
    float32's time) and its BatchNorm compute in float32, so that BatchNorm reads a float32 x and the cast down
    moves to the next convolution's input."""
    from core.layers import BatchNorm

    convolution, norm = model.layers[0], model.layers[1]
    convolution.computes_in_float32 = True
    norm.__class__ = type("Float32BatchNorm", (BatchNorm,), {"mixed_input": property(lambda self: False)})


def padded_batch_norm(tf, layer):
    """The BatchNorm's fused training path with a 16-bit x zero-padded to a multiple of 16 channels, the count
    oneDNN's bfloat16 kernel needs (instead of the cast to float32 and back), and y sliced back. The padded channels
    are 0 with variance 0 and are dropped: the real channels' statistics and y are the layer's."""
    fused = layer._fused

    def padded(x, training):
        channels = layer.moving_mean.shape[0]
        extra = -channels % 16
        if x.dtype == tf.float32 or not training or not extra:
            return fused(x, training)
        gamma = tf.pad(layer.gamma, [[0, extra]], constant_values=1.0) if layer.scale else tf.ones([channels + extra])
        beta = tf.pad(layer.beta, [[0, extra]]) if layer.center else tf.zeros([channels + extra])
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]]), gamma,
                                                             beta, epsilon=layer.epsilon)
        n = tf.cast(tf.size(x) // channels, tf.float32)
        mean, variance = mean[:channels], unbiased[:channels] * ((n - 1.0) / n)
        layer._move_statistics(mean, variance)
        return y[..., :channels], mean, variance

    return padded


def grouped_in_float32(layer):
    """The BatchNorm's own `_runs_grouped` asked as if x were 16-bit: a float32 x whose channels are not a multiple
    of 16 also takes `_fused_grouped` in training (four kernel calls on 4 or 2 pixels' 48 channels, the ReLU after
    it inside) instead of the float32 kernel on its own 12 or 24 channels."""
    import tensorflow as tf

    runs_grouped = layer._runs_grouped
    return lambda shape, dtype, training: runs_grouped(shape, tf.bfloat16, training)


def batch_norm_between_casts(tf, layer):
    """The BatchNorm's fused path as it was before pixels were grouped: a 16-bit x whose channels are not a
    multiple of 16 cast to float32 for the float32 kernel, and y cast back, in training too."""
    fused = layer._fused

    def between_casts(x, training):
        if x.dtype == tf.float32 or not layer.moving_mean.shape[0] % 16:
            return fused(x, training)
        y, mean, variance = fused(tf.cast(x, tf.float32), training)
        return tf.cast(y, x.dtype), mean, variance

    return between_casts


class AdamOp:
    """Our Adam with each variable's update as one tf.raw_ops.ResourceApplyAdam (the same formula, epsilon-hat
    form; 1 - beta computed in float32 by the kernel)."""

    def __new__(cls, learning_rate):
        import tensorflow as tf
        from core import optimizers

        class Fused(optimizers.Adam):
            def _step_rate(self, learning_rate, dtype):
                t = tf.cast(self.step + 1, dtype)
                return (learning_rate, tf.pow(tf.constant(self.beta_1, dtype), t),
                        tf.pow(tf.constant(self.beta_2, dtype), t))

            def _update(self, g, w, i, rate):
                learning_rate, beta_1_power, beta_2_power = rate
                tf.raw_ops.ResourceApplyAdam(
                    var=w.handle, m=self.m[i].handle, v=self.v[i].handle, beta1_power=beta_1_power,
                    beta2_power=beta_2_power, lr=learning_rate, beta1=tf.constant(self.beta_1, w.dtype),
                    beta2=tf.constant(self.beta_2, w.dtype), epsilon=tf.constant(self.epsilon, w.dtype), grad=g)

        return Fused(learning_rate)
