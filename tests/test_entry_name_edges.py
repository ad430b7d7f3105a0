"""Edge cases of on-demand entry names and method registration (review of issue #17's registry): a name
the wrappers treat specially cannot be registered, a seed suffix is set once, and every on-demand entry has
exactly one name (its results directory), so no run is silently repeated under an alias."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import methods
from vlmeval_dop.registry import EntryError, get_entry


class _Rand:
    """A seeded vision-side method (the guide's `rand`, inline)."""

    name, families = "rnd", None

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, ctx, n_keep):
        g = torch.Generator().manual_seed(self.seed)
        return [torch.randperm(s.num_tokens, generator=g)[:n_keep].sort().values for s in ctx.images]


@pytest.fixture()
def rnd():
    before = dict(methods._REGISTRY)
    methods.register_method("rnd", kind="vision", entry_args={"seed": int})(_Rand)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(before)


def test_resize_is_reserved():
    """`resize` entries run the wrappers' image resize (entries.IMAGE_SIDE_REDUCERS), never a registered
    class: a user's method of that name would silently not run, so the name is refused."""
    before = dict(methods._REGISTRY)
    try:
        with pytest.raises(methods.RegistrationError, match="reserved"):
            methods.register_method("resize", kind="vision")(_Rand)
    finally:
        methods._REGISTRY.clear()
        methods._REGISTRY.update(before)
