"""Shared test settings: float32 parity needs the highest matmul precision on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
