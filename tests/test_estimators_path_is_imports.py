"""The path-IS, mixture, forecast and score modules import without JAX (fresh interpreter)."""

import subprocess
import sys

from lpe_jax.estimators import scores


def test_new_estimator_modules_import_no_jax():
    code = (
        "import sys\n"
        "from lpe_jax.estimators import forecast, mixture, path_is, scores\n"
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert scores.__name__.endswith("scores")
