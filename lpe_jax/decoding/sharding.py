"""Row sharding for the paired sampler: one mesh axis, 'rows', over the local devices.

Row-batched arrays (tokens, per-row caches, keys) are split over 'rows'; params and the shared
prompt cache are replicated. Every row's computation stays on one device, so results do not depend
on the device count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ROWS = "rows"


def row_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'rows' over `devices` (default: all local devices)."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("row_mesh needs at least one device; got an empty list.")
    return Mesh(np.array(devs), (ROWS,))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over 'rows', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(ROWS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def round_to_devices(rows: int, num_devices: int) -> int:
    """Largest multiple of num_devices that is <= rows, and at least num_devices."""
    return max(num_devices, rows // num_devices * num_devices)
