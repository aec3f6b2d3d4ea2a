"""Diagnostics of the loss aggregators: gradient variance, bias and direction.

`variance` holds the model-free statistics (per-aggregator moments of K batch
estimates, the paper's variance model, the online proxy, the length-exponent fit);
`measure` draws real rollout batches from a policy and computes per-response gradients.
Command line: `python -m deltal_jax.analysis --help`.
"""

from deltal_jax.analysis.variance import (
    DEFAULT_AGGREGATORS,
    Aggregator,
    EstimateSet,
    RunningMean,
    coefficient_matrix,
    fit_length_exponent,
    parse_aggregators,
    variance_proxy,
    variance_statistics,
)

__all__ = [
    "DEFAULT_AGGREGATORS",
    "Aggregator",
    "EstimateSet",
    "RunningMean",
    "coefficient_matrix",
    "fit_length_exponent",
    "parse_aggregators",
    "variance_proxy",
    "variance_statistics",
]
