"""Individual divergence curves (paper Section 3.2.2), their JSON form, and interpolation (Appendix C.1, Eq. 8).

A :class:`DivergenceProfile` holds what the profiling runs measured for one model + reducer + dataset:

* ``D_A(d_A) = D(d_A, L, N_v)``, ``D_P(d_P) = D(L, d_P, N_v)``, ``D_v(n_v) = D(L, L, n_v)`` at the sampling
  points (paper Table 6, ``eval_configs/models.yaml``), mean over the validation samples;
* optionally the system-token curves ``D_A_sys(d)``, ``D_P_sys(d)`` (Appendix F.6, Eq. 14);
* optionally the per-sample values behind each mean.

**The full point is implied.** ``D(L, L, N_v)`` is the divergence of the original model from itself, exactly 0
(Eq. 10 of identical inputs; the executor guarantees bit-identical logits for the full policy). A profile
stores only what was measured; interpolation anchors every curve at ``(L, 0)`` (depth curves) or
``(N_v, 0)`` (``D_v``) unless that point was measured, in which case the measured value is used.

**Interpolation (Eq. 8)** is linear between the nearest sampled points ``x_i <= x <= x_{i+1}``; a sampled
point returns its measured value exactly. **Outside the sampled range** (below the smallest sampled point;
above is impossible because the anchor is the largest legal value) the paper says nothing. We make it a
choice, ``outside=``:

* ``"inf"`` (default): no estimate, the value is ``+inf`` so the optimiser never picks such a policy. With
  the paper's sampling points this only affects ``n_v`` below the smallest sampled count (16, or 80 for
  LLaVA-NeXT), which the ``n_min`` constraint excludes at every paper budget anyway.
* ``"clamp"``: hold the value of the smallest sampled point (what ``numpy.interp`` does). Optimistic: it
  claims that 1 visual token is as good as 16.

Points may be non-integers (a transferred profile, Appendix C.5); the curves are evaluated at every integer
``0..L`` / ``0..N_v`` at once (vectorised).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "vlmeval-dop/divergence-profile"
FORMAT_VERSION = 1
OUTSIDE_MODES = ("inf", "clamp")
CURVE_NAMES = ("D_A", "D_P", "D_v", "D_A_sys", "D_P_sys")
OBJECTIVES = ("kl", "acc_drop")


def _num(x) -> int | float:
    """A point as int when integral (stable JSON: ``26`` not ``26.0``), else float."""
    if isinstance(x, bool):
        raise TypeError("a sampling point must be a number, not a bool")
    f = float(x)
    if not math.isfinite(f):
        raise ValueError(f"sampling point {x!r} is not finite")
    return int(f) if f.is_integer() else f


@dataclass(frozen=True)
class Curve:
    """Measured points of one individual divergence curve, sorted by the policy parameter.

    Attributes:
        points: parameter values (depths or visual token counts), strictly increasing after construction.
        values: mean divergence at each point (finite).
        per_sample: optional per-sample values, one tuple per point (same sample order in every tuple).
    """

    points: tuple[int | float, ...]
    values: tuple[float, ...]
    per_sample: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        pts = [_num(p) for p in self.points]
        vals = [float(v) for v in self.values]
        if len(pts) != len(vals) or not pts:
            raise ValueError(f"a curve needs as many values as points (>= 1), got {len(pts)} and {len(vals)}")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"curve values must be finite, got {vals}")
        if len(set(pts)) != len(pts):
            raise ValueError(f"duplicate sampling points in {pts}")
        order = sorted(range(len(pts)), key=lambda i: pts[i])  # canonical order: ascending
        per = self.per_sample
        if per is not None:
            per = [tuple(float(v) for v in row) for row in per]
            if len(per) != len(pts):
                raise ValueError(f"per_sample needs one row per point ({len(pts)}), got {len(per)}")
            per = tuple(per[i] for i in order)
        object.__setattr__(self, "points", tuple(pts[i] for i in order))
        object.__setattr__(self, "values", tuple(vals[i] for i in order))
        object.__setattr__(self, "per_sample", per)

    @classmethod
    def from_mapping(cls, data: Mapping[Any, float]) -> "Curve":
        """``{point: value}`` -> Curve."""
        return cls(tuple(data.keys()), tuple(data.values()))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"points": list(self.points), "values": list(self.values)}
        if self.per_sample is not None:
            d["per_sample"] = [list(row) for row in self.per_sample]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Curve":
        unknown = set(d) - {"points", "values", "per_sample"}
        if unknown:
            raise ValueError(f"unknown curve keys {sorted(unknown)}")
        per = d.get("per_sample")
        return cls(tuple(d["points"]), tuple(d["values"]), None if per is None else tuple(tuple(r) for r in per))

    def with_anchor(self, full_at: int | float) -> tuple[np.ndarray, np.ndarray]:
        """(points, values) as float arrays with the implied ``(full_at, 0)`` added unless it was measured."""
        pts = [float(p) for p in self.points]
        vals = list(self.values)
        if max(pts) > full_at:
            raise ValueError(f"sampling point {max(pts)} exceeds the full value {full_at}")
        if float(full_at) not in pts:
            pts.append(float(full_at))
            vals.append(0.0)
        return np.asarray(pts, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def interpolate(points, values, grid, *, outside: str = "inf") -> np.ndarray:
    """Eq. 8 evaluated at every entry of ``grid`` (vectorised).

    ``D^(x) = D(x_i) + (x - x_i) / (x_{i+1} - x_i) * (D(x_{i+1}) - D(x_i))`` with the nearest sampled points
    ``x_i <= x <= x_{i+1}``; at a sampled point the measured value is returned exactly. ``points`` must be
    strictly increasing. Outside ``[points[0], points[-1]]``: ``+inf`` (``outside="inf"``) or the nearest
    end value (``outside="clamp"``).
    """
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"outside must be one of {OUTSIDE_MODES}, got {outside!r}")
    xp = np.asarray(points, dtype=np.float64)
    yp = np.asarray(values, dtype=np.float64)
    x = np.asarray(grid, dtype=np.float64)
    if xp.ndim != 1 or xp.shape != yp.shape or xp.size == 0:
        raise ValueError("points and values must be 1-D of equal, non-zero length")
    if np.any(np.diff(xp) <= 0):
        raise ValueError(f"points must be strictly increasing, got {xp.tolist()}")
    n = xp.size
    # i with x_i <= x < x_{i+1}; x == x_last maps to the last point
    i = np.searchsorted(xp, x, side="right") - 1
    inside = (x >= xp[0]) & (x <= xp[-1])
    out = np.empty_like(x)
    if n == 1:
        out[...] = yp[0]
    else:
        j = np.clip(i, 0, n - 2)
        t = (x - xp[j]) / (xp[j + 1] - xp[j])
        out[...] = yp[j] + t * (yp[j + 1] - yp[j])
        exact = inside & (xp[np.clip(i, 0, n - 1)] == x)
        out[exact] = yp[np.clip(i, 0, n - 1)][exact]  # no rounding at the measured points themselves
    if outside == "inf":
        out[~inside] = np.inf
    else:
        out[x < xp[0]] = yp[0]
        out[x > xp[-1]] = yp[-1]
    return out


@dataclass(frozen=True)
class DivergenceTables:
    """Interpolated individual divergences at every integer policy value.

    ``D_A[d]``, ``D_P[d]`` for ``d = 0..L``; ``D_v[n]`` for ``n = 0..N_v``; the system-token tables likewise
    over ``0..L`` (or None). Values are float64, ``+inf`` where there is no estimate.
    """

    D_A: np.ndarray
    D_P: np.ndarray
    D_v: np.ndarray
    D_A_sys: np.ndarray | None = None
    D_P_sys: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in CURVE_NAMES:
            arr = getattr(self, name)
            if arr is not None:
                arr = np.asarray(arr, dtype=np.float64)
                if arr.ndim != 1:
                    raise ValueError(f"{name} must be 1-D")
                object.__setattr__(self, name, arr)
        if self.D_A.shape != self.D_P.shape:
            raise ValueError("D_A and D_P must both have L+1 entries")
        for name in ("D_A_sys", "D_P_sys"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != self.D_A.shape:
                raise ValueError(f"{name} must have L+1 entries")

    @property
    def L(self) -> int:
        return self.D_A.size - 1

    @property
    def N_v(self) -> int:
        return self.D_v.size - 1

    @property
    def has_system(self) -> bool:
        return self.D_A_sys is not None and self.D_P_sys is not None

    @classmethod
    def from_mappings(
        cls, L: int, N_v: int, D_A: Mapping, D_P: Mapping, D_v: Mapping, *, outside: str = "inf", **sys: Mapping
    ) -> "DivergenceTables":
        """Build from ``{point: value}`` mappings (the full point is implied, see module doc)."""
        return DivergenceProfile(
            model="", reducer="", dataset="", n_samples=0, seed=None, L=L, N_v=N_v,
            D_A=Curve.from_mapping(D_A), D_P=Curve.from_mapping(D_P), D_v=Curve.from_mapping(D_v),
            **{k: Curve.from_mapping(v) for k, v in sys.items()},
        ).tables(outside=outside)


@dataclass(frozen=True)
class DivergenceProfile:
    """Measured individual divergence curves of one model, reducer and validation set.

    Attributes:
        model: model key (``eval_configs/models.yaml``, e.g. ``llava15_7b``).
        reducer: visual token reducer the ``D_v`` runs used (``cdpruner``, ``vispruner``, ``resize``, ...).
        dataset: validation data (e.g. ``TextVQA_train``).
        n_samples, seed: size of the validation subset and the seed that drew it.
        L, N_v: decoder layers and visual tokens of the model the points refer to.
        D_A, D_P, D_v: curves over MHA depth, MLP depth, visual token count.
        D_A_sys, D_P_sys: optional system-token curves (Eq. 14).
        objective: ``"kl"`` (Eq. 10) or ``"acc_drop"`` (Eq. 13, accuracy drop instead of divergence).
        top_k, eps: the Eq. 9-10 settings the values were measured with.
        meta: free-form JSON data (e.g. transfer provenance); keep it deterministic.
    """

    model: str
    reducer: str
    dataset: str
    n_samples: int
    seed: int | None
    L: int
    N_v: int
    D_A: Curve
    D_P: Curve
    D_v: Curve
    D_A_sys: Curve | None = None
    D_P_sys: Curve | None = None
    objective: str = "kl"
    top_k: int = 10
    eps: float = 1e-8
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.L < 1 or self.N_v < 1:
            raise ValueError(f"need L >= 1 and N_v >= 1, got L={self.L}, N_v={self.N_v}")
        if (self.D_A_sys is None) != (self.D_P_sys is None):
            raise ValueError("give both system-token curves (D_A_sys, D_P_sys) or neither")
        for name in CURVE_NAMES:
            curve = getattr(self, name)
            if curve is None:
                continue
            top = self.N_v if name == "D_v" else self.L
            if curve.points[0] < 0 or curve.points[-1] > top:
                raise ValueError(f"{name} points {list(curve.points)} leave 0..{top}")
        object.__setattr__(self, "meta", dict(self.meta))

    # ----------------------------------------------------------------- interpolation
    def curve(self, name: str) -> Curve | None:
        if name not in CURVE_NAMES:
            raise KeyError(f"unknown curve {name!r}; valid: {CURVE_NAMES}")
        return getattr(self, name)

    def anchored(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Sampled points of a curve with the implied full point, as float arrays."""
        curve = self.curve(name)
        if curve is None:
            raise ValueError(f"profile has no {name} curve")
        return curve.with_anchor(self.N_v if name == "D_v" else self.L)

    def interpolate(self, name: str, x=None, *, outside: str = "inf") -> np.ndarray:
        """Eq. 8 for curve ``name`` at ``x`` (default: every integer 0..L, or 0..N_v for D_v)."""
        if x is None:
            x = np.arange((self.N_v if name == "D_v" else self.L) + 1)
        pts, vals = self.anchored(name)
        return interpolate(pts, vals, x, outside=outside)

    def tables(self, *, outside: str = "inf") -> DivergenceTables:
        """All curves interpolated at every integer value (the optimiser's input)."""
        sys = {n: self.interpolate(n, outside=outside) for n in ("D_A_sys", "D_P_sys") if self.curve(n) is not None}
        return DivergenceTables(
            D_A=self.interpolate("D_A", outside=outside),
            D_P=self.interpolate("D_P", outside=outside),
            D_v=self.interpolate("D_v", outside=outside),
            **sys,
        )

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        curves = {n: self.curve(n).to_dict() for n in CURVE_NAMES if self.curve(n) is not None}
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "reducer": self.reducer,
            "dataset": self.dataset,
            "n_samples": int(self.n_samples),
            "seed": None if self.seed is None else int(self.seed),
            "L": int(self.L),
            "N_v": int(self.N_v),
            "objective": self.objective,
            "top_k": int(self.top_k),
            "eps": float(self.eps),
            "curves": curves,
            "meta": self.meta,
        }

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, fixed indentation, shortest round-trip float repr, ASCII only."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False, ensure_ascii=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DivergenceProfile":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a divergence profile (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported profile version {d.get('version')!r} (this code reads {FORMAT_VERSION})")
        curves = d["curves"]
        unknown = set(curves) - set(CURVE_NAMES)
        if unknown:
            raise ValueError(f"unknown curves {sorted(unknown)}; valid: {CURVE_NAMES}")
        return cls(
            model=d["model"], reducer=d["reducer"], dataset=d["dataset"], n_samples=d["n_samples"],
            seed=d["seed"], L=d["L"], N_v=d["N_v"], objective=d.get("objective", "kl"),
            top_k=d.get("top_k", 10), eps=d.get("eps", 1e-8), meta=d.get("meta", {}),
            **{n: Curve.from_dict(curves[n]) for n in CURVE_NAMES if n in curves},
        )

    @classmethod
    def from_json(cls, text: str) -> "DivergenceProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (UTF-8, ``\\n`` line ends); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DivergenceProfile":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def with_curves(self, **curves: Curve | None) -> "DivergenceProfile":
        """A copy with some curves replaced."""
        return replace(self, **curves)


def profile_from_measurements(
    *,
    model: str,
    reducer: str,
    dataset: str,
    n_samples: int,
    seed: int | None,
    L: int,
    N_v: int,
    D_A: Mapping[Any, float],
    D_P: Mapping[Any, float],
    D_v: Mapping[Any, float],
    D_A_sys: Mapping[Any, float] | None = None,
    D_P_sys: Mapping[Any, float] | None = None,
    per_sample: Mapping[str, Mapping[Any, Sequence[float]]] | None = None,
    **kwargs: Any,
) -> DivergenceProfile:
    """Build a profile from ``{point: mean}`` mappings, with optional ``{curve: {point: [per-sample]}}``."""
    per_sample = per_sample or {}

    def make(name: str, data: Mapping[Any, float] | None) -> Curve | None:
        if data is None:
            return None
        pts = tuple(data.keys())
        rows = per_sample.get(name)
        per = None if rows is None else tuple(tuple(rows[p]) for p in pts)
        return Curve(pts, tuple(data.values()), per)

    return DivergenceProfile(
        model=model, reducer=reducer, dataset=dataset, n_samples=n_samples, seed=seed, L=L, N_v=N_v,
        D_A=make("D_A", D_A), D_P=make("D_P", D_P), D_v=make("D_v", D_v),
        D_A_sys=make("D_A_sys", D_A_sys), D_P_sys=make("D_P_sys", D_P_sys), **kwargs,
    )
