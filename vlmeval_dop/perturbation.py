"""Policy perturbation (paper App. F.7.2, Tables 29-30): random swaps that break the depth-wise constraint.

Starting from a DOP policy, `k` retained visual operations of one module type (MHA or MLP) are pruned and
`k` pruned ones are retained instead, drawn uniformly at random; the paper repeats this 10 times and reports
the best and the mean score. The result is no longer a suffix policy, so it is returned as the module's
depth set to L plus an `OperationMask` of the pruned layers (same number of pruned operations, hence the
same TFLOPs up to the per-layer token counts).

Which operations count: the paper's policy as printed (retained = layers < d, pruned = layers >= d for the
module's depth d). For MLP swaps this includes layers >= d_A, where a visual token's MLP is dead (nothing
attends to it afterwards, see `DOPPolicy.effective()`): retaining such an operation changes nothing, so
those draws only lose an operation. We keep the paper's literal sampling and note it here.

Draws are deterministic in `seed` (Python's `random.Random(seed)`), so entries are reproducible by name:
`llava15_7b_dopcd28__swap3mha.s7`.
"""
from __future__ import annotations

import random
from dataclasses import replace

from .policy import DOPPolicy, OperationMask, PolicyError

MODULES = ("mha", "mlp")


def swap_operations(policy: DOPPolicy, num_layers: int, module: str, k: int, seed: int) -> tuple[DOPPolicy, OperationMask]:
    """(policy with `module`'s depth at L, mask of its pruned layers) after swapping `k` operations.

    Raises:
        PolicyError: unknown module, or `k` larger than the retained or the pruned operations.
    """
    if module not in MODULES:
        raise PolicyError(f"swap module {module!r} unknown; valid: {', '.join(MODULES)}")
    policy.validate(num_layers)
    depth = policy.d_A if module == "mha" else policy.d_P
    kept, pruned = list(range(depth)), list(range(depth, num_layers))
    if not 1 <= k <= min(len(kept), len(pruned)):
        raise PolicyError(
            f"cannot swap {k} {module.upper()} operations of {policy} (L={num_layers}): "
            f"valid: 1..{min(len(kept), len(pruned))}"
        )
    rng = random.Random(seed)
    now_pruned = set(rng.sample(kept, k))
    now_kept = set(rng.sample(pruned, k))
    layers = frozenset((set(pruned) - now_kept) | now_pruned)
    if module == "mha":
        return replace(policy, d_A=num_layers), OperationMask(attn=layers)
    return replace(policy, d_P=num_layers), OperationMask(mlp=layers)
