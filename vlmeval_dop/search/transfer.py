"""Cross-model transfer of individual divergences (paper Appendix C.5, Eq. 12).

A source profile measured on a model with ``L`` layers and ``N_v`` visual tokens is moved to a target with
``L'`` and ``N_v'`` by rescaling its *sampling points* and keeping their divergences::

    d'_A = d_A * L' / L,    d'_P = d_P * L' / L,    n'_v = n_v * N_v' / N_v          (Eq. 12)

The rescaled points are generally not integers; the target's integer values are then interpolated from
them exactly as in Appendix C.1 (Eq. 8), which is what :meth:`DivergenceProfile.tables` does for any
profile. So a transferred profile is an ordinary :class:`DivergenceProfile` whose points are the rescaled
(possibly fractional) values, with the target's ``L'`` and ``N_v'``. The implied full point maps onto
itself (``L -> L'``, ``N_v -> N_v'``), so it stays implied. System-token curves rescale with ``L'/L``.

Products are formed as ``(d * L') / L``: an exact integer product followed by one correctly rounded
division, so points that land on integers are exact integers.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .curves import CURVE_NAMES, Curve, DivergenceProfile, DivergenceTables


def rescale_points(points: Sequence[int | float], source_extent: int, target_extent: int) -> tuple[float, ...]:
    """Eq. 12 for one parameter: ``x * target_extent / source_extent`` for every point."""
    if source_extent <= 0 or target_extent <= 0:
        raise ValueError(f"extents must be positive, got {source_extent} -> {target_extent}")
    return tuple((float(x) * target_extent) / source_extent for x in points)


def transfer_profile(
    source: DivergenceProfile,
    *,
    L: int,
    N_v: int,
    model: str | None = None,
    reducer: str | None = None,
) -> DivergenceProfile:
    """Rescale ``source``'s sampling points to a target with ``L`` layers and ``N_v`` visual tokens (Eq. 12).

    Divergences and per-sample values are kept as they are. ``model``/``reducer`` name the target (the
    paper transfers DOP_CD curves to DOP_R models); ``meta["transfer"]`` records the source.
    """
    curves = {}
    for name in CURVE_NAMES:
        c = source.curve(name)
        if c is None:
            continue
        src, tgt = (source.N_v, N_v) if name == "D_v" else (source.L, L)
        curves[name] = Curve(rescale_points(c.points, src, tgt), c.values, c.per_sample)
    meta = dict(source.meta)
    meta["transfer"] = {"from_model": source.model, "from_L": source.L, "from_N_v": source.N_v, "from_reducer": source.reducer}
    return replace(
        source,
        model=model if model is not None else f"{source.model}->target",
        reducer=reducer if reducer is not None else source.reducer,
        L=L,
        N_v=N_v,
        meta=meta,
        **curves,
    )


def transfer_tables(source: DivergenceProfile, *, L: int, N_v: int, outside: str = "inf") -> DivergenceTables:
    """Transferred divergences at every integer value of the target (Appendix C.5 end to end)."""
    return transfer_profile(source, L=L, N_v=N_v).tables(outside=outside)


def transfer_to_model(source: DivergenceProfile, model: str, *, reducer: str | None = None, config_dir=None) -> DivergenceProfile:
    """Transfer ``source`` to a paper model of ``eval_configs/models.yaml`` (its L and N_v)."""
    from ..models_config import get_model

    arch = get_model(model, config_dir).arch
    return transfer_profile(source, L=arch.num_layers, N_v=arch.visual_tokens, model=model, reducer=reducer)
