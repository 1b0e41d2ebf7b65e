"""Streaming Mean and Accuracy: weighted by examples, in variables, usable inside tf.function."""
import numpy as np
import pytest
import tensorflow as tf

from core import metrics


def test_mean_weights_batch_means_by_the_number_of_examples():
    mean = metrics.Mean()
    mean.update(tf.constant(1.0), weight=100)   # a batch of 100 with mean loss 1
    mean.update(tf.constant(4.0), weight=50)    # a last, smaller batch of 50 with mean 4
    assert float(mean.result()) == pytest.approx((100 * 1 + 50 * 4) / 150)  # 2.0, not (1 + 4) / 2
    mean.update(tf.constant([1.0, 2.0, 3.0]))   # three examples, weight 1 each
    assert float(mean.result()) == pytest.approx((300 + 6) / 153)
    mean.reset()
    assert float(mean.result()) == 0.0
    assert mean.total.dtype == tf.float64 and not mean.total.trainable


def test_accuracy_counts_examples():
    accuracy = metrics.Accuracy()
    logits = tf.constant([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.5, 0.2]])
    accuracy.update(tf.constant([1, 0, 1, 0]), logits)       # 3 of 4
    accuracy.update(tf.constant([2], tf.int64), logits[2:3])  # 1 of 1
    assert float(accuracy.result()) == pytest.approx(4 / 5)
    accuracy.reset()
    assert float(accuracy.result()) == 0.0
    with pytest.raises(ValueError, match=r"expected labels \[N\] and logits \[N, classes\]"):
        accuracy.update(tf.constant([[1]]), logits)


def test_streaming_inside_tf_function_matches_numpy():
    rng = np.random.default_rng(0)
    loss, accuracy = metrics.Mean(), metrics.Accuracy()

    @tf.function
    def update(logits, labels, batch_loss):
        loss.update(batch_loss, weight=tf.shape(labels)[0])
        accuracy.update(labels, logits)

    all_logits, all_labels, all_losses = [], [], []
    for n in [32, 32, 7]:
        logits = rng.standard_normal((n, 10)).astype(np.float32)
        labels = rng.integers(0, 10, n).astype(np.int32)
        per_example = rng.random(n)
        update(tf.constant(logits), tf.constant(labels), tf.constant(per_example.mean(), tf.float32))
        all_logits.append(logits)
        all_labels.append(labels)
        all_losses.append(per_example.astype(np.float32).astype(np.float64))
    expected_accuracy = (np.concatenate(all_logits).argmax(1) == np.concatenate(all_labels)).mean()
    assert float(accuracy.result()) == pytest.approx(expected_accuracy)
    assert float(loss.result()) == pytest.approx(np.concatenate(all_losses).mean(), rel=1e-6)
