"""jaxmtl: multi-task learning, loss functions and model editing in JAX.

Subpackages: ``losses`` (pure per-example losses), ``mtl`` (per-task gradients),
``transforms`` (Optax transforms over per-task gradients), ``taskvec`` (task vectors and
tangent-space editing), ``models`` (Flax NNX blocks and the ``functional`` bridge),
``analysis``, ``data`` (offline data sets), ``train`` (a small resumable loop).
"""

__version__ = "0.1.0"
