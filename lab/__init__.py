"""The codelab from Python, for notebooks and scripts (docs/api.md; README: the lessons as notebooks).

    from lab import mnist, settings, build, fit, LiveCurves, show_mistakes
    data = mnist()
    config = settings("dense", epochs=5)
    model = build("dense", config, data)
    history = fit(model, data, config, callbacks=[LiveCurves()])
    show_mistakes(model, data.test)

TensorFlow is loaded first with its C++ start-up notices hidden (a notebook would show them in red).
"""
from core.native_logs import load_tensorflow

load_tensorflow()

from lab.api import (Data, DataNotFound, build, evaluate, fit, learning_rate_schedule,  # noqa: E402
                     make_optimizer, mnist, predictions, settings)
from lab.live import LiveCurves, in_notebook, show_mistakes  # noqa: E402
from lab.lr_finder import LRFinderResult, find_lr  # noqa: E402

__all__ = ["Data", "DataNotFound", "mnist", "settings", "build", "fit", "evaluate", "predictions",
           "learning_rate_schedule", "make_optimizer", "LiveCurves", "show_mistakes", "in_notebook", "find_lr",
           "LRFinderResult"]
