"""One way to reach Ray for every job: the given / ``RAY_ADDRESS`` cluster, or a local one on 127.0.0.1.

Under ``ray job submit`` the job's environment carries ``RAY_ADDRESS`` and
``ray.init(address=...)`` joins that cluster.  Otherwise a local Ray starts,
pinned to the loopback address (by default Ray advertises the machine's own
IP) and without the dashboard.
"""
from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Initialise Ray once; returns True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    return True
