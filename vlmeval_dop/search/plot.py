"""Plot of a profile's individual divergence curves with the chosen policies marked (cf. paper Figure 4).

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works headless and
does not disturb an interactive session that imported pyplot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..policy import DOPPolicy
from .curves import DivergenceProfile

_PANELS = (
    ("D_A", "MHA depth $d_A$", "d_A"),
    ("D_P", "MLP depth $d_P$", "d_P"),
    ("D_v", "visual tokens $n_v$", "n_v"),
)


def plot_profile(
    profile: DivergenceProfile | str | Path,
    out: str | Path | None = None,
    *,
    policies: Mapping[float, DOPPolicy] | None = None,
    outside: str = "inf",
    title: str | None = None,
) -> Path:
    """Draw D_A(d_A), D_P(d_P), D_v(n_v): measured points, the implied full point, Eq. 8 interpolation.

    Args:
        profile: a profile or the path of its JSON file.
        out: PNG path; default: next to the profile JSON with the suffix ``.png`` (required when
            ``profile`` is an object).
        policies: ``{budget: policy}`` to mark (one vertical line per budget in each panel).
        outside: interpolation mode outside the sampled range (``+inf`` values are not drawn).

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(profile, DivergenceProfile):
        src = Path(profile)
        profile = DivergenceProfile.load(src)
        out = src.with_suffix(".png") if out is None else out
    if out is None:
        raise ValueError("out is required when plotting a profile object (or pass the profile's JSON path)")
    out = Path(out)

    panels = list(_PANELS)
    if profile.D_A_sys is not None:
        panels += [("D_A_sys", "system MHA depth $d_A^s$", "d_A_sys"), ("D_P_sys", "system MLP depth $d_P^s$", "d_P_sys")]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan"]
    for ax, (name, xlabel, attr) in zip(axes, panels):
        top = profile.N_v if name == "D_v" else profile.L
        grid = np.arange(top + 1)
        y = profile.interpolate(name, grid, outside=outside)
        ok = np.isfinite(y)
        ax.plot(grid[ok], y[ok], "-", color="tab:blue", lw=1.2, label="interpolated (Eq. 8)")
        curve = profile.curve(name)
        ax.plot(curve.points, curve.values, "o", color="tab:blue", ms=5, label="measured")
        if top not in curve.points:
            ax.plot([top], [0.0], "o", mfc="white", mec="tab:blue", ms=5, label="full (implied 0)")
        for i, (budget, pol) in enumerate(sorted((policies or {}).items(), reverse=True)):
            x = getattr(pol, attr)
            if x is None:
                continue
            ax.axvline(x, color=colours[i % len(colours)], ls="--", lw=1, label=f"{budget:g}: {attr}={x}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("divergence" if profile.objective == "kl" else "accuracy drop")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"{profile.model} / {profile.reducer} / {profile.dataset} (n={profile.n_samples})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
