"""The codelab from Python, for notebooks and scripts (README: the lessons as notebooks).

    from lab import mnist, settings, build, fit, LiveCurves, show_mistakes
    data = mnist()
    config = settings("dense", epochs=5)
    model = build("dense", config, data)
    history = fit(model, data, config, callbacks=[LiveCurves()])
    show_mistakes(model, data.test)
"""
from lab.api import (Data, DataNotFound, build, evaluate, fit, learning_rate_schedule, make_optimizer, mnist,
                     predictions, settings)
from lab.live import LiveCurves, in_notebook, show_mistakes
from lab.lr_finder import LRFinderResult, find_lr

__all__ = ["Data", "DataNotFound", "mnist", "settings", "build", "fit", "evaluate", "predictions",
           "learning_rate_schedule", "make_optimizer", "LiveCurves", "show_mistakes", "in_notebook", "find_lr",
           "LRFinderResult"]
