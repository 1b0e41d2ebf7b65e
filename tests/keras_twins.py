"""Keras twins of the model zoo (same layers, same shapes), the oracle for parameter counts.

Keras is used only in tests and benchmarks, never in core/ or models/.
"""
import keras
import numpy as np

L = keras.layers


def _keras_dense(hidden, activation, dropout, dropout_on_input=False):
    layers = [keras.Input((28, 28, 1)), L.Flatten()]
    if dropout and dropout_on_input:
        layers.append(L.Dropout(dropout))
    for units in hidden:
        layers.append(L.Dense(units, activation=activation))
        if dropout:
            layers.append(L.Dropout(dropout))
    return keras.Sequential(layers + [L.Dense(10)])


def _keras_conv(convs, dropout, batch_norm=False):
    layers = [keras.Input((28, 28, 1))]
    for filters, kernel, stride in convs:
        if batch_norm:
            layers += [L.Conv2D(filters, kernel, stride, padding="same", use_bias=False),
                       L.BatchNormalization(center=True, scale=False), L.Activation("relu")]
        else:
            layers.append(L.Conv2D(filters, kernel, stride, padding="same", activation="relu"))
    layers.append(L.Flatten())
    if batch_norm:
        layers += [L.Dense(200, use_bias=False), L.BatchNormalization(center=True, scale=False),
                   L.Activation("relu")]
    else:
        layers.append(L.Dense(200, activation="relu"))
    return keras.Sequential(layers + [L.Dropout(dropout), L.Dense(10)])


KERAS_TWINS = {
    "softmax": lambda: keras.Sequential([keras.Input((28, 28, 1)), L.Flatten(), L.Dense(10)]),
    "dense_sigmoid": lambda: _keras_dense((200, 60), "sigmoid", 0.0),
    "dense": lambda: _keras_dense((200, 60), "relu", 0.0),
    "dense_decay": lambda: _keras_dense((200, 100, 60), "relu", 0.25),
    "conv": lambda: _keras_conv([(12, 3, 1), (24, 6, 2), (32, 6, 2)], 0.5),
    "conv_bn": lambda: _keras_conv([(12, 3, 1), (24, 6, 2), (32, 6, 2)], 0.3, batch_norm=True),
    "conv_bn_big": lambda: _keras_conv([(24, 6, 1), (48, 5, 2), (64, 4, 2)], 0.25, batch_norm=True),
    "dense5": lambda: _keras_dense((200, 100, 60, 30), "relu", 0.0),
    "conv_small": lambda: _keras_conv([(6, 6, 1), (12, 5, 2), (24, 4, 2)], 0.35),
}


def keras_counts(model):
    """(total, trainable, non_trainable) as model.summary() reports them."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable + non_trainable, trainable, non_trainable
