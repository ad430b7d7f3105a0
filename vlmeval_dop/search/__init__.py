"""DOP policy search: divergence (Eq. 9-10), curves and interpolation (Eq. 8), optimisation (Eq. 7),
cross-model transfer (Eq. 12) and extensions (Eq. 13, Eq. 14, F.3 joint grid, E.1 Spearman).

Pure math on measured numbers: nothing here runs a model or imports vlmeval. Plotting (matplotlib) is
imported on first use of :func:`plot_profile`.
"""
from .curves import Curve, DivergenceProfile, DivergenceTables, interpolate, profile_from_measurements
from .divergence import EPS, TOP_K, SampleStat, TopKReference, accuracy_drop, probs_from_logits, topk_kl
from .extensions import (
    GridPolicies,
    JointGridResult,
    JointRecord,
    SpearmanResult,
    additive_divergence,
    brute_force_optimize_with_system,
    f3_grid,
    grid_additive_search,
    grid_policies,
    joint_grid_search,
    optimize_accuracy,
    optimize_with_system,
    spearman,
    spearman_additive_vs_joint,
    table7_policies,
)
from .optimize import (
    InfeasibleBudgetError,
    PolicySearch,
    SearchResult,
    brute_force_optimize,
    budget_for_uniform_tokens,
    closed_form_flops,
    optimize,
    optimize_for_model,
    resolve_n_min,
    write_policy,
)
from .transfer import rescale_points, transfer_profile, transfer_tables, transfer_to_model

__all__ = [
    "Curve", "DivergenceProfile", "DivergenceTables", "interpolate", "profile_from_measurements",
    "EPS", "TOP_K", "SampleStat", "TopKReference", "accuracy_drop", "probs_from_logits", "topk_kl",
    "GridPolicies", "JointGridResult", "JointRecord", "SpearmanResult", "additive_divergence", "brute_force_optimize_with_system",
    "f3_grid", "grid_additive_search", "grid_policies", "joint_grid_search", "optimize_accuracy", "optimize_with_system", "spearman",
    "spearman_additive_vs_joint", "table7_policies",
    "InfeasibleBudgetError", "PolicySearch", "SearchResult", "brute_force_optimize", "budget_for_uniform_tokens",
    "closed_form_flops", "optimize", "optimize_for_model", "resolve_n_min", "write_policy",
    "rescale_points", "transfer_profile", "transfer_tables", "transfer_to_model",
    "plot_profile",
]


def __getattr__(name: str):
    if name == "plot_profile":  # keeps matplotlib out of `import vlmeval_dop.search`
        from .plot import plot_profile

        return plot_profile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
