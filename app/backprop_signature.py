"""What the export adds so that serve.py's page can show backpropagation and teach the network one digit.

  backprop(image, label)  signature: image as serving_default takes it (float32 in [0, 1]), label int64 [N] in
                          [0, K) ->
      loss               []       L = mean_n [logsumexp(z_n) - z_n[label_n]], the training loss
      probabilities, classes, input            as the activations signature
      activation_<i>     y_i, layer i's output (i = 1 .. L; the last is the logits z)
      gradient_<i>       dL/dy_i, the same shape
      input_gradient     dL/dx [N, H, W, C], the saliency: which pixels would change the loss
      weight_gradient_<j> dL/dv_j for the model's trainable variables v_1 .. v_T in layer order
  teach_adam(image, label), teach_sgd(image, label)
                          tf.functions (not signatures: they change variables): one step of the project's own
                          Adam (Keras's defaults beta_1 0.9, beta_2 0.999, epsilon 1e-7, as train.py builds it)
                          or plain SGD, at the rate in the variable `teach_learning_rate`, on the same gradients;
                          they return the loss before the step.
  teach_state             [v_1 .. v_T, Adam's m_1 .. m_T, v_1 .. v_T and step]: everything a step changes, so a
                          caller can keep several copies of the model and swap one in (serve.py keeps one per page).
  assets/backprop.json    {"loss_formula", "layers": [{"name", "backward_formula", "gradient": "gradient_<i>",
                          "variables": [{"name": "conv1/w", "shape", "gradient": "weight_gradient_<j>"}]}]}

Everything is computed by the layers' hand-written backward passes (core/layers.py), chained from the loss back
to the input as core/backprop.py chains them, in inference mode: BatchNorm uses its moving statistics and
dropout is off, so the gradients are those of the prediction the page shows, and teaching on one picture does not
move the moving statistics. tests/test_teach.py checks them against the tape.
"""
import json
import os

import tensorflow as tf

from core import activations, backprop, losses, optimizers
from core.module import shape_str

BACKPROP_ASSET = "backprop.json"
LOSS = losses.softmax_cross_entropy


def backpropagate(model, x, labels):
    """The chain rule, one layer at a time, in inference mode:
    (loss, [y_1 .. y_L], [dL/dy_1 .. dL/dy_L], dL/dx, {variable ref: dL/dvariable})."""
    outputs, caches = [], []
    y = x
    for layer in model.layers:
        y, cache = layer.forward_with_cache(y, training=False)
        outputs.append(y)
        caches.append(cache)
    loss = LOSS(y, labels)
    dy = backprop.loss_backward(LOSS)(y, labels)
    gradients, by_variable = [], {}
    for layer, cache in zip(reversed(model.layers), reversed(caches)):
        gradients.insert(0, dy)
        dy, layer_gradients = layer.backward(dy, cache)
        for attribute, gradient in layer_gradients.items():
            by_variable[getattr(layer, attribute).ref()] = gradient
    return loss, outputs, gradients, dy, by_variable


def trainable_by_layer(model):
    """[(layer name, layer, [("layer/variable", variable)])] with only the trainable variables, in layer order."""
    return [(name, layer, [(n, v) for n, v in layer.named_variables(name) if v.trainable])
            for name, layer in zip(model.layer_names, model.layers)]


def output_shape(model):
    """The built model's output shape, e.g. (None, 10)."""
    shape = model.input_shape
    for layer in model.layers:
        shape = layer.output_shape(shape)
    return shape


def has_backward(model):
    """Whether every layer of `model` has a hand-written backward pass."""
    shape = model.input_shape
    try:
        for layer in model.layers:
            layer.backward_formula(shape)
            shape = layer.output_shape(shape)
    except NotImplementedError:
        return False
    return True


def describe(model):
    """The contents of assets/backprop.json (see the module docstring)."""
    shape, layers, j = model.input_shape, [], 0
    for i, (name, layer, named) in enumerate(trainable_by_layer(model), start=1):
        variables = []
        for variable_name, variable in named:
            j += 1
            variables.append({"name": variable_name, "shape": variable.shape.as_list(),
                              "gradient": f"weight_gradient_{j}"})
        layers.append({"name": name, "backward_formula": layer.backward_formula(shape), "gradient": f"gradient_{i}",
                       "variables": variables})
        shape = layer.output_shape(shape)
    loss_formula = backprop.LOSS_BACKWARD[LOSS][1].format(classes=shape[-1])
    return {"loss_formula": f"{loss_formula}  (z = logits{shape_str(shape)})", "layers": layers}


def attach(module, model, assets_dir):
    """Adds the backprop signature, the teach functions, their variables and assets/backprop.json to the export's
    `module` (app.export.ServingModule); returns the signatures to save, {"backprop": ...}, or {} for a model
    with a layer that has no hand-written backward pass."""
    if not has_backward(model):
        return {}
    from app.export import _as_images, _checked_pixels
    path = os.path.join(assets_dir, BACKPROP_ASSET)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(describe(model), f, indent=1)
    module.backprop_description = tf.saved_model.Asset(path)
    trainable = [v for _, _, named in trainable_by_layer(model) for _, v in named]
    module.teach_learning_rate = tf.Variable(0.001, trainable=False, name="teach_learning_rate")
    module.adam = optimizers.Adam(lambda step: module.teach_learning_rate)
    module.adam.build(trainable)
    module.sgd = optimizers.SGD(lambda step: module.teach_learning_rate)
    module.teach_state = [*trainable, *module.adam.m, *module.adam.v, module.adam.step]
    classes = output_shape(model)[-1]

    def inputs(image, label):
        x = _checked_pixels(_as_images(image, module.shape))
        label = tf.convert_to_tensor(label)
        ok = tf.logical_and(tf.equal(tf.shape(label), tf.shape(x)[:1]),
                            tf.reduce_all(tf.logical_and(label >= 0, label < classes)))
        check = tf.debugging.Assert(ok, [f"label must be [N] class ids in 0..{classes - 1}, one per image; got",
                                         label])
        with tf.control_dependencies([check]):
            return x, tf.identity(label)

    specs = [tf.TensorSpec(shape=None, dtype=tf.float32, name="image"),
             tf.TensorSpec(shape=[None], dtype=tf.int64, name="label")]

    @tf.function(input_signature=specs, autograph=False)
    def backprop_signature(image, label):
        x, label = inputs(image, label)
        loss, outputs, gradients, dx, by_variable = backpropagate(model, x, label)
        logits = outputs[-1]
        result = {"loss": loss, "probabilities": activations.softmax(logits),
                  "classes": tf.argmax(logits, axis=-1, output_type=tf.int64), "input": x, "input_gradient": dx}
        for i, (y, dy) in enumerate(zip(outputs, gradients), start=1):
            result[f"activation_{i}"] = y
            result[f"gradient_{i}"] = dy
        for j, variable in enumerate(trainable, start=1):
            result[f"weight_gradient_{j}"] = by_variable[variable.ref()]
        return result

    def teacher(optimizer):
        @tf.function(input_signature=specs, autograph=False)
        def teach(image, label):
            x, label = inputs(image, label)
            loss, _, _, _, by_variable = backpropagate(model, x, label)
            optimizer.apply([by_variable[v.ref()] for v in trainable], trainable)
            return loss
        return teach

    module.backprop = backprop_signature
    module.teach_adam = teacher(module.adam)
    module.teach_sgd = teacher(module.sgd)
    return {"backprop": module.backprop}
