"""A strided convolution's input gradient as one stride-1 convolution: Conv2D's fast path for its backward pass.

Backpropagation through z = conv2d(x, w, stride s) needs dx = conv2d_transpose(dz, w). Along one axis (the other
alike; the sums over channels left out), with x_pad the padded input and k the kernel's taps:

    z[i]        = sum_k x_pad[s*i + k] * w[k]
    dx_pad[p]   = sum_{i, k with s*i + k = p} dz[i] * w[k]

Write p = s*u + a and k = s*t + a with the phase a in 0..s-1: then i = u - t, and

    dx_pad[s*u + a] = sum_{t = 0..T-1} dz[u - t] * w[s*t + a]            T = ceil(k / s) taps per phase

so each of the s phases of dx is a stride-1 correlation of dz with every s-th tap of w, reversed. In 2-D the s*s
phases of all C input channels are the s*s*C output channels of one stride-1 convolution of dz, and
depth_to_space(s) puts each phase back at its rows and columns:

    dx = crop(depth_to_space(conv2d(pad(dz), w_sub, stride 1, valid), s))
    w_sub[T-1-t, T-1-t', f, (a*s + a')*C + c] = w[s*t + a, s*t' + a', c, f]     (w padded with zero taps to s*T)

The same products as conv2d_transpose, summed in another order: equal to float32 rounding, and to float64
rounding in float64 (tests/test_fast_paths.py). It is the forward convolution of the "sub-pixel convolution"
(Shi et al., 2016) run backwards. It pays because oneDNN's forward convolution kernels are faster than its
backward-data ones on these shapes: on conv_bn's 6x6 stride-2 layers (batch 64, one AMD EPYC Zen 4 core pair)
0.72 and 0.80 of the backward-data kernel's time in float32, 0.69 and 0.69 in bfloat16. With T = 2 (4x4 stride 2)
or a kernel padded with zero taps (5x5 stride 2 -> 6x6, 44% more products) it measured slower on conv_bn_big's
layers, so Conv2D takes this path only where the kernel is a whole number of strides, at least three (`pays`).
`python benchmarks/bench_subpixel.py` measures every geometry; benchmarks/RESULTS.md has the figures.
"""
import tensorflow as tf

__all__ = ["pays", "input_gradient", "conv2d"]


def pays(kernel_size, strides):
    """Whether Conv2D's fast path computes its input gradient here: one stride s > 1 along both axes, and each
    kernel size a multiple of s with at least three taps per phase (measured: module docstring)."""
    (kh, kw), (sh, sw) = kernel_size, strides
    return sh == sw > 1 and kh % sh == 0 and kw % sw == 0 and min(kh, kw) // sh >= 3


def _along(size, k, s, padding):
    """Along one axis of x's `size`, for a kernel of k taps and stride s: (dz's padding before, its padding after,
    both for the stride-1 convolution and negative where dz is cropped instead; where dx starts in
    depth_to_space's output; T, the taps per phase)."""
    if padding == "VALID":
        out, before = -(-(size - k + 1) // s), 0
    else:
        out = -(-size // s)
        before = max((out - 1) * s + k - size, 0) // 2
    taps = -(-k // s)
    first, last = before // s, (before + size - 1) // s  # the u whose phases cover dx[0 .. size - 1]
    pad_before = taps - 1 - first
    pad_after = (last - first + 1) + taps - 1 - pad_before - out
    return pad_before, pad_after, before % s, taps


def subpixel_kernel(w, stride, taps):
    """w [kh, kw, C, F] -> w_sub [T, T', F, s*s*C] (module docstring), w padded with zero taps to s*T x s*T'."""
    kh, kw, c, f = w.shape
    (th, tw), s = taps, stride
    w = tf.pad(w, [[0, s * th - kh], [0, s * tw - kw], [0, 0], [0, 0]])
    w = tf.reverse(tf.reshape(w, [th, s, tw, s, c, f]), [0, 2])       # [t, a, t', a', c, f], t reversed
    return tf.reshape(tf.transpose(w, [0, 2, 5, 1, 3, 4]), [th, tw, f, s * s * c])


def input_gradient(dz, w, input_size, stride, padding):
    """dx [N, H, W, C] = conv2d_transpose(dz, w) for z = conv2d(x, w, stride, padding), x [N, H, W, C] with
    input_size = (H, W) known, computed as one stride-1 convolution (module docstring). padding: "SAME" or "VALID"."""
    (kh, kw), (h, w_size) = w.shape[:2], input_size
    (pbh, pah, offh, th), (pbw, paw, offw, tw) = (_along(h, kh, stride, padding), _along(w_size, kw, stride, padding))
    crop = [max(-p, 0) for p in (pbh, pah, pbw, paw)]
    if any(crop):
        dz = dz[:, crop[0]:dz.shape[1] - crop[1], crop[2]:dz.shape[2] - crop[3], :]
    pads = [[0, 0], [max(pbh, 0), max(pah, 0)], [max(pbw, 0), max(paw, 0)], [0, 0]]
    phases = tf.nn.conv2d(dz, subpixel_kernel(w, stride, (th, tw)), 1, pads)  # [N, U, V, s*s*C]
    dx_pad = tf.nn.depth_to_space(phases, stride) if stride > 1 else phases
    return dx_pad[:, offh:offh + h, offw:offw + w_size, :]


def conv2d(x, w, stride, padding):
    """z = conv2d(x, w, stride, padding) whose input gradient is `input_gradient` (its kernel gradient is
    TensorFlow's conv2d_backprop_filter, as autodiff's). x [N, H, W, C] with H and W known."""
    strides = (1, stride, stride, 1)
    w = tf.convert_to_tensor(w)  # a variable read here, outside: tf.custom_gradient then sees only tensors

    @tf.custom_gradient
    def convolution(x, w):
        def gradient(dz):
            return (input_gradient(dz, w, x.shape[1:3], stride, padding),
                    tf.compat.v1.nn.conv2d_backprop_filter(x, tf.shape(w), dz, strides, padding))

        return tf.nn.conv2d(x, w, strides, padding), gradient

    return convolution(x, w)
