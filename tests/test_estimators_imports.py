"""The NumPy side of the package must import without JAX (run in a fresh interpreter)."""

import subprocess
import sys

from lpe_jax.estimators import importance


def test_no_jax_imported():
    code = (
        "import sys, lpe_jax.estimators, lpe_jax.evaluation.evaluation\n"
        "import lpe_jax.evaluation.synthetic, lpe_jax.evaluation.plots\n"
        "import lpe_jax.evaluation.independent\n"
        "from lpe_jax.estimators import naive, importance, lpe, pooled\n"
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importance.__name__.endswith("importance")
