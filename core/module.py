"""The base of every layer: variables created once, shape and rank checks, the formula shown by summaries.

A new layer subclasses `Layer` and writes two methods:

    class Scale(Layer):  # y = x * s, s [C]
        def _create_variables(self, input_shape):
            self.s = tf.Variable(tf.ones(input_shape[-1:], self.dtype), name="s")
        def _forward(self, x, training):
            return x * self.s

`output_shape(input_shape)` (default: traced from `_forward`) and `formula(input_shape)` (default:
"y = scale(x[N,C])") may be overridden for a clearer summary; a class puts them after its math (`_forward`,
`backward`), so a reader meets the equations first. Shapes use N for the batch dimension.

Two bases in core/layers.py carry what most layers repeat: `Affine` for y = activation(linear(x, w) + b) (the
kernel and bias, the activation, the backward pass through them and the formulas around a subclass's own
`_linear`, `_kernel_gradient`, `_input_gradient`), and `Windowed` for a window slid over an image (output size,
padding amounts, the valid-window check). DepthwiseConv2D is both: its math and display, nothing else.

Dtype: a layer is built in the floating dtype of the first input it sees (float32 when built from a shape
alone or from integer inputs), its variables are created in that dtype (`self.dtype`, passed to the
initializers), and later inputs are cast to it in `Layer.__call__`. Under mixed precision
(core/precision.py) a layer computes in 16 bits from casts of its float32 weights, unless it declares
`computes_in_float32` (BatchNorm's statistics, softmax); `mixed_input` says such a layer reads a 16-bit x as it
is, without casting it up.
"""
import tensorflow as tf

from core import activations


def shape_str(shape):
    """(None, 28, 28, 1) -> "[N,28,28,1]" (an unknown non-batch dimension prints as "?")."""
    dims = ["N" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(shape)]
    return "[" + ",".join(dims) + "]"


def batch_shape(shape):
    """Any shape-like -> tuple with the batch dimension as None."""
    dims = tf.TensorShape(shape).as_list()
    if not dims:
        return ()
    return (None,) + tuple(dims[1:])


def snake_case(name):
    """"GlobalAveragePooling2D" -> "global_average_pooling2d" (a layer's default name)."""
    out = []
    for i, c in enumerate(name):
        if c.isupper() and i > 0 and not name[i - 1].isupper() and not name[i - 1].isdigit():
            out.append("_")
        out.append(c.lower())
    return "".join(out)


def pair(value, what, layer):
    """2 -> (2, 2); (2, 3) -> (2, 3); anything else is a ValueError."""
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{layer}: {what} must be a positive int or a pair of positive ints, got {value!r}")
    return value


def padding_mode(padding, layer):
    """"same" / "valid" (any case) -> lower case; anything else is a ValueError."""
    if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
        raise ValueError(f"{layer}: unknown padding {padding!r}; expected 'same' or 'valid'")
    return padding.lower()


def initializer(init, what, layer):
    """`init` if it is an initializer (a callable (shape, dtype) -> tensor), else a ValueError."""
    if not callable(init):
        raise ValueError(f"{layer}: {what} must be an initializer (shape, dtype) -> tensor such as "
                         f"core.initializers.GlorotUniform(), got {init!r}")
    return init


def activated(fn, z):
    """The formula "y = fn(z)", or "y = z" when fn is the identity."""
    name = activations.name_of(fn)
    return f"y = {name}({z})" if name else f"y = {z}"


def _floating(dtype, what):
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(f"{what}: layers compute in a floating dtype, got {dtype.name}")
    return dtype


def named_variables(module, prefix):
    """[("prefix/attribute/.../variable", variable)] for every variable `module` holds, found by tf.Module's own
    traversal: attributes, lists, dicts and nested modules, e.g. "block/convs/0/w"."""
    found = module._flatten(predicate=lambda value: isinstance(value, tf.Variable), with_path=True)
    return [("/".join([prefix, *(str(part) for part in path)]), variable) for path, variable in found]


class Layer(tf.Module):
    """y = f(x; variables). Subclasses write `_create_variables(input_shape)` (if they have variables) and
    `_forward(x, training)`; `input_rank` is the rank they accept (None: any rank >= 2).

    Mixed precision (core/precision.py) reads two declarations: `computes_in_float32`, True for a layer whose
    math needs float32 when the rest computes in 16 bits (its weights are then not cast, and its input is cast
    up); `mixed_input`, True for such a layer that reads a 16-bit x as it is (float32 inside, 16-bit y out)."""

    input_rank = None
    computes_in_float32 = False
    mixed_input = False

    def __init__(self, name=None):
        super().__init__(name=name or snake_case(type(self).__name__))
        self.built = False
        self.input_shape = None
        self.dtype = None

    def __str__(self):
        return f"{type(self).__name__} '{self.name}'"

    def __call__(self, x, training=False):
        """y = layer(x); `training` is a Python bool (batch statistics and dropout masks when True)."""
        if tf.is_tensor(training):
            raise ValueError(f"{self}: training must be a Python bool (trace one tf.function per mode), "
                             f"got a tensor {training!r}")
        return self._forward(self._input(x), bool(training))

    def _input(self, x):
        """x as a tensor of the layer's dtype, the layer built from its shape on the first call, else checked."""
        x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
        if not self.built:
            self.build(x.shape, x.dtype if x.dtype.is_floating else tf.float32)
        else:
            self._check_input_shape(batch_shape(x.shape))
        return tf.cast(x, self.dtype) if x.dtype != self.dtype else x

    def build(self, input_shape, dtype=tf.float32):
        """Creates the variables for inputs of `input_shape` (batch dimension ignored) in `dtype`; idempotent."""
        input_shape = batch_shape(input_shape)
        if self.built:
            self._check_input_shape(input_shape)
            return
        self._check_rank(input_shape)
        self.dtype = _floating(dtype, str(self))
        with self.name_scope:
            self._create_variables(input_shape)
        self.input_shape = input_shape
        self.built = True

    def _check_rank(self, input_shape):
        rank = len(input_shape)
        if self.input_rank is None:
            if rank < 2:
                raise ValueError(f"{self}: expected an input with a batch dimension (rank >= 2), "
                                 f"got shape {shape_str(input_shape)}")
        elif rank != self.input_rank:
            expected = {2: "2 [N,features]", 4: "4 [N,height,width,channels]"}.get(self.input_rank, self.input_rank)
            raise ValueError(f"{self}: expected input of rank {expected}, "
                             f"got shape {shape_str(input_shape)} (rank {rank})")

    def _check_input_shape(self, input_shape):
        built = self.input_shape
        compatible = len(input_shape) == len(built) and all(
            a is None or b is None or a == b for a, b in zip(input_shape[1:], built[1:]))
        if not compatible:
            raise ValueError(f"{self} was built for input {shape_str(built)} but got {shape_str(input_shape)}")

    def _create_variables(self, input_shape):
        """Layers without variables create nothing."""

    def _forward(self, x, training):
        raise NotImplementedError

    def forward_with_cache(self, x, training=False):
        """(y, cache) for a built layer, x a tensor of the layer's dtype: y as the forward pass computes it (moving
        statistics and dropout generators advance as in a call) and what `backward` needs, returned rather than
        stored on the layer so a traced step stays pure. The default cache is (x, y)."""
        y = self._forward(x, bool(training))
        return y, (x, y)

    def backward(self, dy, cache):
        """(dx, {variable attribute: gradient}) from dy = dL/dy [shape of y] and the forward pass's cache, derived
        by hand (docs/backprop.md); core.backprop chains them through a Sequential."""
        raise NotImplementedError(f"{self} has no hand-written backward pass (docs/backprop.md)")

    def output_shape(self, input_shape=None):
        """Output shape for `input_shape` (default: the built one), batch dimension as None; by default read
        from a trace of `_forward` in inference mode (nothing runs)."""
        input_shape = self._shape_or_built(input_shape)
        forward = tf.function(lambda x: self._forward(x, False))
        traced = forward.get_concrete_function(tf.TensorSpec(input_shape, self.dtype or tf.float32))
        return batch_shape(traced.structured_outputs.shape)

    def formula(self, input_shape=None):
        """The layer's equation with shapes, e.g. "y = relu(x[N,3136] @ w[3136,200] + b[200])"; by default
        "y = layer_norm(x[N,200])" (the snake-case class name)."""
        input_shape = self._shape_or_built(input_shape)
        return f"y = {snake_case(type(self).__name__)}(x{shape_str(input_shape)})"

    def backward_formula(self, input_shape=None):
        """The backward pass as equations with shapes, e.g. "dw[3136,200] = xᵀ @ dy; dx[N,3136] = dy @ wᵀ"."""
        raise NotImplementedError(f"{self} has no hand-written backward pass (docs/backprop.md)")

    def named_variables(self, prefix=None):
        """[("layer/variable", variable)], e.g. [("conv1/w", ...), ("conv1/b", ...)] (prefix: the layer's name)."""
        return named_variables(self, self.name if prefix is None else prefix)

    def _shape_or_built(self, input_shape):
        if input_shape is None:
            if self.input_shape is None:
                raise ValueError(f"{self} is not built: pass input_shape or call build(input_shape) first")
            return self.input_shape
        return batch_shape(input_shape)
