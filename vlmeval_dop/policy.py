"""The DOP policy `(d_A, d_P, n_v)` (paper Eq. 3-4) and its optional system-token depths (Eq. 14).

Depths count layers from the input: visual tokens take part in the MHA of decoder layers `0 .. d_A-1`
and in the MLP of layers `0 .. d_P-1` (the paper numbers layers from 1 and prunes layers `d+1 .. L`,
which is the same set). `n_v` is the number of visual tokens the reducer keeps (`None` = all).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import yaml


class PolicyError(ValueError):
    """A policy that does not fit the model it is applied to."""


@dataclass(frozen=True)
class DOPPolicy:
    """Depth-wise operation pruning policy.

    Args:
        d_A: visual tokens attend (as queries and keys/values) in layers `< d_A`.
        d_P: visual tokens go through the MLP in layers `< d_P`.
        n_v: visual tokens kept by the reducer before the decoder; `None` keeps all of them.
        d_A_sys, d_P_sys: the same depths for the system-prompt token group (paper Eq. 14, an
            extension); `None` (default) leaves system tokens unpruned.
    """

    d_A: int
    d_P: int
    n_v: int | None = None
    d_A_sys: int | None = None
    d_P_sys: int | None = None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def full(cls, num_layers: int) -> "DOPPolicy":
        """The unpruned policy `(L, L, None)`: identical to the stock model."""
        return cls(num_layers, num_layers, None)

    @classmethod
    def parse(cls, text: str) -> "DOPPolicy":
        """Parse `"d_A,d_P,n_v"` (n_v may be `all`/`none`) or `"d_A,d_P,n_v,d_A_sys,d_P_sys"`."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) not in (3, 5):
            raise PolicyError(f"policy must be 'd_A,d_P,n_v' or 'd_A,d_P,n_v,d_A_sys,d_P_sys', got {text!r}")

        def num(p: str) -> int | None:
            if p.lower() in ("", "none", "all"):
                return None
            try:
                return int(p)
            except ValueError:
                raise PolicyError(f"policy entries must be integers, got {p!r} in {text!r}") from None

        values = [num(p) for p in parts]
        if values[0] is None or values[1] is None:
            raise PolicyError(f"d_A and d_P are required integers, got {text!r}")
        return cls(*values)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DOPPolicy":
        """Inverse of :meth:`to_dict`; unknown keys are an error (typos must not pass silently)."""
        known = {"d_A", "d_P", "n_v", "d_A_sys", "d_P_sys"}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown policy keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "DOPPolicy":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> "DOPPolicy":
        data = yaml.safe_load(text)
        if isinstance(data, list):  # the compact form used in eval_configs: [d_A, d_P, n_v]
            return cls(*data)
        return cls.from_dict(data)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict; system-token depths are omitted while they are off."""
        d = asdict(self)
        if self.d_A_sys is None and self.d_P_sys is None:
            d.pop("d_A_sys")
            d.pop("d_P_sys")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __str__(self) -> str:
        s = f"(d_A={self.d_A}, d_P={self.d_P}, n_v={'all' if self.n_v is None else self.n_v}"
        if self.has_system_depths:
            s += f", d_A_sys={self.d_A_sys}, d_P_sys={self.d_P_sys}"
        return s + ")"

    # ----------------------------------------------------------------- semantics
    @property
    def has_system_depths(self) -> bool:
        return self.d_A_sys is not None or self.d_P_sys is not None

    def effective(self, num_layers: int) -> "DOPPolicy":
        """The cheapest policy with identical outputs: `(d_A, min(d_P, max(d_A - 1, 0)), n_v)` for d_A < L.

        Once a visual token leaves MHA (layer >= d_A) nothing reads it again. Its output of layer `d_A - 1`
        is read by nobody either: the key/value it gives there come from that layer's *input*. So its MLP
        work in layers `d_A - 1 .. d_P - 1` is dead (and at layer `d_A - 1` its query, attention output and
        `o_proj` too: the executor runs that layer with the visual tokens as keys/values only). The paper's
        Eq. 11 still counts the dead work (see flops.policy_tflops). With `d_A = L` (= `num_layers`) the
        last layer's visual outputs are the model's outputs at those positions, so nothing is dead. The
        same holds for the system-token group.
        """

        def mlp_depth(d_A: int, d_P: int) -> int:
            return d_P if d_A >= num_layers else min(d_P, max(d_A - 1, 0))

        d_P_sys = self.d_P_sys
        if self.d_A_sys is not None and d_P_sys is not None:
            d_P_sys = mlp_depth(self.d_A_sys, d_P_sys)
        return replace(self, d_P=mlp_depth(self.d_A, self.d_P), d_P_sys=d_P_sys)

    def kv_only_layers(self, num_layers: int) -> tuple[int | None, int | None]:
        """Layer where the visual (resp. system) group takes part in attention as keys/values only:
        `d_A - 1` (resp. `d_A_sys - 1`) when that depth is in 1..L-1, else None."""

        def last(d: int | None) -> int | None:
            return d - 1 if d is not None and 1 <= d < num_layers else None

        return last(self.d_A), last(self.d_A_sys)

    def resolved_n_v(self, num_visual_tokens: int) -> int:
        """`n_v` with `None` resolved to all visual tokens."""
        return num_visual_tokens if self.n_v is None else self.n_v

    def is_full(self, num_layers: int, num_visual_tokens: int | None = None) -> bool:
        """True when the policy prunes nothing (then the executor leaves the model untouched)."""
        no_vis = self.n_v is None or (num_visual_tokens is not None and self.n_v >= num_visual_tokens)
        sys_full = all(d is None or d >= num_layers for d in (self.d_A_sys, self.d_P_sys))
        return self.d_A >= num_layers and self.d_P >= num_layers and no_vis and sys_full

    def validate(self, num_layers: int, num_visual_tokens: int | None = None) -> "DOPPolicy":
        """Check `0 <= d <= L` and `1 <= n_v <= visual tokens`; return self or raise PolicyError."""
        for name in ("d_A", "d_P", "d_A_sys", "d_P_sys"):
            v = getattr(self, name)
            if v is None and name in ("d_A_sys", "d_P_sys"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= num_layers:
                raise PolicyError(f"{name}={v!r} is outside 0 <= {name} <= L={num_layers} (the model's decoder layers)")
        if self.n_v is not None:
            if not isinstance(self.n_v, int) or isinstance(self.n_v, bool) or self.n_v < 1:
                raise PolicyError(f"n_v={self.n_v!r} must be an integer >= 1 (or None for all visual tokens)")
            if num_visual_tokens is not None and self.n_v > num_visual_tokens:
                raise PolicyError(
                    f"n_v={self.n_v} exceeds the model's {num_visual_tokens} visual tokens; valid: 1..{num_visual_tokens}"
                )
        return self


_OP_RE = re.compile(r"^(mha|mlp)(\d+(?:-\d+)?(?:\.\d+(?:-\d+)?)*)$")


@dataclass(frozen=True)
class OperationMask:
    """Visual-token operations pruned at individual layers, on top of a depth policy (paper App. G).

    The depth policy prunes *suffixes* (every layer >= d_A / d_P). The redundancy analysis of the paper
    (Tables 26-28: one operation at layer l, or three consecutive ones) and the policy perturbations
    (Tables 29-30: random swaps) prune arbitrary sets instead: visual tokens skip the MHA of the layers in
    `attn` (neither queries nor keys/values there, they pass through by the residual) and the MLP of the
    layers in `mlp`, and take part again in the other layers.
    """

    attn: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", frozenset(int(i) for i in self.attn))
        object.__setattr__(self, "mlp", frozenset(int(i) for i in self.mlp))

    def validate(self, num_layers: int) -> "OperationMask":
        """Raise PolicyError unless every layer index is in 0..num_layers-1."""
        bad = sorted(i for i in self.attn | self.mlp if not 0 <= i < num_layers)
        if bad:
            raise PolicyError(f"operation mask names layers {bad}; valid: 0..{num_layers - 1}")
        return self

    def visual_in(self, layer: int) -> tuple[bool, bool]:
        """(visual tokens in this layer's MHA, in its MLP) as far as the mask is concerned."""
        return layer not in self.attn, layer not in self.mlp

    def __bool__(self) -> bool:
        return bool(self.attn or self.mlp)

    @classmethod
    def parse(cls, text: str) -> "OperationMask":
        """Parse the entry-name suffix form: `mha4-6`, `mlp12`, `mha3.27` (1-based layers as in the paper's
        tables: l1 is the first layer; `a-b` a range, `.` separates items), several joined by `__`.

        Raises:
            PolicyError: a malformed item (the message shows the valid forms).
        """
        attn: set[int] = set()
        mlp: set[int] = set()
        for part in text.split("__"):
            m = _OP_RE.match(part)
            if not m:
                raise PolicyError(
                    f"operation mask {part!r} is not of the form mha<layers> or mlp<layers> with 1-based layers "
                    "like 4, 4-6 or 3.27 (e.g. llava15_7b__mha4-6)"
                )
            target = attn if m.group(1) == "mha" else mlp
            for item in m.group(2).split("."):
                a, _, b = item.partition("-")
                lo, hi = int(a), int(b or a)
                if lo < 1 or hi < lo:
                    raise PolicyError(f"operation mask {part!r}: layers are 1-based and ranges increasing")
                target.update(range(lo - 1, hi))
        return cls(frozenset(attn), frozenset(mlp))
