"""Evaluation, NumPy only (no JAX): the paper's protocol over rollout banks and synthetic families.

`evaluation` scores methods' AUROC against rollout budgets by Monte Carlo over a bank;
`synthetic` builds families of prompts with known rate curves; `report` prints the tables;
`plots` draws Figures 1 and 2 (matplotlib). The evaluation module's public names are re-exported
here (``from lpe_jax.evaluation import evaluate, RolloutBank``).
"""

from lpe_jax.evaluation.evaluation import *  # noqa: F403
from lpe_jax.evaluation.evaluation import __all__  # noqa: F401
