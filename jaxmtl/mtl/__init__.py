"""Per-task gradients of multi-task objectives: Jacobians, Gramians and weighted sums."""

from jaxmtl.mtl.gradients import (
    combine,
    gramian,
    representation_gradients,
    shared_mask,
    task_gradients,
)

__all__ = [
    "combine",
    "gramian",
    "representation_gradients",
    "shared_mask",
    "task_gradients",
]
