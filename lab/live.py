"""Pictures for notebooks: curves redrawn live during training, and the misrecognised digits.

    history = fit(model, data, config, callbacks=[LiveCurves()])   # one figure, redrawn each epoch
    show_mistakes(model, data.test)                                 # the wrong ones first, in red

In Jupyter the curves are one output, replaced in place at every epoch end (IPython's display handle);
anywhere else LiveCurves draws nothing, or writes the same picture to `path` if it is given.
"""
import io

import numpy as np
from PIL import Image

from app import pictures
from core.trainer import Callback
from lab.api import predictions

__all__ = ["LiveCurves", "show_mistakes", "in_notebook"]


def in_notebook():
    """Whether this code runs in a Jupyter kernel (which can show pictures)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def curves_png(history):
    """The PNG bytes of the loss and accuracy curves of `history` (train.py's curves.png)."""
    buffer = io.BytesIO()
    pictures.save_curves_png(buffer, history.steps, history.epochs)
    return buffer.getvalue()


class LiveCurves(Callback):
    """Trainer callback: loss and accuracy, training (each log point) and validation (each epoch), redrawn into
    one output at every epoch end in Jupyter; elsewhere nothing, or the picture written to `path`.

    display: (picture) -> handle with update(picture), for tests; default IPython's display(..., display_id=True).
    """

    def __init__(self, path=None, display=None):
        self.path = path
        self._display = display
        self.history = None
        self.handle = None
        self.redraws = 0

    def on_train_begin(self, trainer):
        self.history = trainer.history
        self.handle = None
        if self._display is None and in_notebook():
            from IPython.display import display
            self._display = lambda picture: display(picture, display_id=True)

    def on_epoch_end(self, epoch, step, logs):
        if self._display is None and self.path is None:
            return
        png = curves_png(self.history)
        if self.path is not None:
            with open(self.path, "wb") as file:
                file.write(png)
        if self._display is not None:
            picture = _Png(png)
            if self.handle is None:
                self.handle = self._display(picture)
            else:
                self.handle.update(picture)
        self.redraws += 1


class _Png:
    """PNG bytes that Jupyter shows as a picture."""

    def __init__(self, data):
        self.data = data

    def _repr_png_(self):
        return self.data


def show_mistakes(model, dataset, count=50, columns=10, scale=2):
    """A picture (PIL.Image, shown by Jupyter) of the first `count` examples of `dataset` with the misrecognised
    ones first, tinted red and labelled true→predicted; prints how many were misrecognised."""
    images, labels, predicted, _ = predictions(model, dataset)
    wrong = int(np.sum(predicted != labels))
    print(f"{wrong:,} of {len(labels):,} misrecognised ({100 * wrong / len(labels):.2f}%); "
          f"the first {min(count, wrong)} of them in red")
    order = pictures.mosaic_order(labels, predicted)[:count]
    mosaic = pictures.prediction_mosaic(images[order], labels[order], predicted[order], columns=columns,
                                        max_images=count, scale=scale)
    return Image.fromarray(mosaic)
