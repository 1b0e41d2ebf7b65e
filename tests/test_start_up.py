"""What a fresh process pays to start: the entry points load TensorFlow without the Keras that TensorFlow's
__init__ preloads (1.5 s of a 5 s start on 2 cores), and import nothing else that brings Keras (TensorBoard's
hparams.api does, 1 s); Keras still imports in full afterwards. Only a fresh
process shows it: this one has loaded both."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from core.native_logs import load_tensorflow
tf = load_tensorflow()
import app.run, app.summaries, app.export, predict, serve, train, web.server, lab  # what the entry points import
before = sorted(name for name in sys.modules if name.split(".")[0] in ("keras", "matplotlib"))
import keras
optimizer = keras.optimizers.Adam(0.5)
variable = tf.Variable([1.0])
optimizer.apply([tf.constant([1.0])], [variable])
print(json.dumps({"before": before, "after": float(variable.numpy()[0]), "keras": "keras" in sys.modules}))
"""


def test_tensorflow_loads_without_keras_and_keras_still_imports_afterwards():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["before"] == [] and seen["keras"]
    assert abs(seen["after"] - 0.5) < 1e-5  # Adam's first step moves by about the learning rate
