"""Optax transforms over per-task gradients (multi-task aggregators and loss weightings).

``optax.chain(jaxmtl.transforms.upgrad(), optax.adam(1e-3))``: the first transform takes
per-task gradients (a leading task axis K on every shared leaf, see ``jaxmtl.mtl``) and
returns one parameter-shaped update. The weightings behind them (``G -> w``) live in
``jaxmtl.transforms.weighting``.
"""

# Aggregators and weightings (aggregate.py, weighting.py).
from jaxmtl.transforms import weighting
from jaxmtl.transforms.aggregate import (
    DBMTLState,
    aggregate,
    aligned_mtl,
    cagrad,
    constant,
    db_mtl,
    dualproj,
    dwa,
    fairgrad,
    famo,
    gls,
    graddrop,
    gradvac,
    imtl_g,
    mean,
    mgda,
    mgda_ub,
    nash_mtl,
    pcgrad,
    rlw,
    skip_nonfinite,
    stch,
    summed,
    uncertainty,
    upgrad,
)
from jaxmtl.transforms.flat import FlatMTLState, flat_mtl, sam_perturbation  # F-MTL
from jaxmtl.transforms.rep_mtl import csa_loss, rep_mtl_loss, tsr_loss  # Rep-MTL
from jaxmtl.transforms.weighting import Weighting

__all__ = [
    "DBMTLState",
    "FlatMTLState",
    "Weighting",
    "aggregate",
    "aligned_mtl",
    "cagrad",
    "constant",
    "csa_loss",
    "db_mtl",
    "dualproj",
    "dwa",
    "fairgrad",
    "famo",
    "flat_mtl",
    "gls",
    "graddrop",
    "gradvac",
    "imtl_g",
    "mean",
    "mgda",
    "mgda_ub",
    "nash_mtl",
    "pcgrad",
    "rep_mtl_loss",
    "rlw",
    "sam_perturbation",
    "skip_nonfinite",
    "stch",
    "summed",
    "tsr_loss",
    "uncertainty",
    "upgrad",
    "weighting",
]
