"""One registry of token-reduction methods: `@register_method` on the class, as timm's `@register_model`.

    from vlmeval_dop.methods import register_method

    @register_method("rand", kind="vision", entry_args={"seed": int})
    class RandomReducer: ...                       # select(ctx, n_keep) -> indices per image

    @register_method("l2norm", kind="decoder", budget_knob="keep", knob_range=(0, "n_visual"), args={"k": 2},
                     selection_cost=l2norm_cost)
    class L2NormPruner: ...                        # layers, select(ctx), static layer_tokens(...)

What a registration says, and who reads it:

- `kind`: `vision` (a `vlmeval_dop.reducers.VisualTokenReducer`: keeps `n_keep` visual tokens before the
  LLM; an entry at a TFLOPs budget runs policy (L, L, n_e)) or `decoder` (a
  `vlmeval_dop.executor.DecoderTokenPruner`: drops tokens inside the LLM).
- `budget_knob` (decoder side): the one constructor argument the budget solver may set; the entry gets the
  largest value (within `knob_range`, integers for integer bounds, 1e-4 steps otherwise) whose analytic
  TFLOPs (the class's static `layer_tokens(num_layers, n_visual, text_tokens, **args)` and
  `flops.schedule_flops`) stay within those of n_e visual tokens in every layer. A decoder class naming a
  knob without `layer_tokens` is refused at registration; one with neither is registered and flagged
  "no budget solver": its entries need explicit arguments (eval_configs/entries.yaml `baseline_args`).
  `budget_arg` instead: a method fitted per budget (FitPrune) receives the budget fraction itself.
- `args`: fixed constructor arguments of generated entries (eval_configs/baselines.yaml `args` override
  them for the paper's baselines), `fallback`: argument changes tried in turn when the budget cannot be
  met with `args` (DART: k=1).
- `entry_args`: arguments an entry may set, {name: type}; `seed` makes `{model}_{method}{budget}.s3`
  entries (the seed is passed to the constructor). Methods without it refuse `.sN`.
- `selection_cost(spec, args, counts, n_visual, text_tokens) -> FLOPs`: the selection work of one sample
  (decoder side), printed next to the FLOPs it saves by benchmarks/baseline_overhead.py.

Method names follow vlmeval_dop/entries/names.py (entry names are `{model}_{method}{budget}`).
Discovery: the built-in methods register when `vlmeval_dop.reducers` / `vlmeval_dop.baselines` are imported;
a user's module by `--plugins` (vlmeval_dop.plugins.load_plugins) or the `vlmeval_dop.methods` entry-point
group of an installed package. No vlmeval import here.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .entries.names import check_method_name

KINDS = ("vision", "decoder")
ENTRY_POINT_GROUP = "vlmeval_dop.methods"


class RegistrationError(ValueError):
    """A method registration that cannot work; the message says what to change."""


@dataclass(frozen=True)
class MethodInfo:
    """One registered method (see the module docstring for the fields)."""

    name: str
    kind: str
    cls: type
    budget_knob: str | None = None
    knob_range: tuple[Any, Any] | None = None
    budget_arg: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    fallback: tuple[Mapping[str, Any], ...] = ()
    entry_args: Mapping[str, type] = field(default_factory=dict)
    selection_cost: Callable[..., float] | None = None
    source: str = "builtin"

    @property
    def takes_seed(self) -> bool:
        """True when entries may carry a seed (`{entry}.s3`)."""
        return "seed" in self.entry_args

    @property
    def has_cost_model(self) -> bool:
        """Decoder side: the class gives per-layer token counts (`layer_tokens`) for the analytic TFLOPs."""
        return self.kind == "vision" or callable(getattr(self.cls, "layer_tokens", None))

    def budget_problem(self) -> str | None:
        """Why generated budget entries cannot exist for this method (None: the solver can make them)."""
        if self.kind == "vision" or self.budget_knob or self.budget_arg:
            return None
        return (f"no budget solver: the decoder-side method {self.name!r} registers no budget_knob (and "
                f"{'no' if not self.has_cost_model else 'has a'} layer_tokens cost model); its entries need "
                "explicit arguments (eval_configs/entries.yaml `baseline_args`)")


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    *,
    kind: str,
    budget_knob: str | None = None,
    knob_range: tuple[Any, Any] | None = None,
    budget_arg: str | None = None,
    args: Mapping[str, Any] | None = None,
    fallback: tuple[Mapping[str, Any], ...] | list = (),
    entry_args: Mapping[str, type] | None = None,
    selection_cost: Callable[..., float] | None = None,
) -> Callable[[type], type]:
    """Class decorator registering a token-reduction method under `name` (see the module docstring).

    Raises RegistrationError (at import of the defining module) for a bad name or kind, a decoder-side
    budget knob without a `layer_tokens` cost model or not among the constructor's arguments, entry
    arguments the constructor does not take, or `name` already taken by another class.
    """

    def decorate(cls: type) -> type:
        try:
            check_method_name(name)
        except ValueError as exc:
            raise RegistrationError(f"{cls.__qualname__}: {exc}") from None
        if kind not in KINDS:
            raise RegistrationError(f"{name}: kind {kind!r} unknown; valid: {', '.join(KINDS)}")
        where = f"{cls.__module__}.{cls.__qualname__}"
        params = init_params(cls)
        if kind == "vision":
            if budget_knob is not None or budget_arg is not None or args or fallback:
                raise RegistrationError(f"{name} ({where}): a vision-side method's budget is the kept token count "
                                        "n_keep given to select(); budget_knob/budget_arg/args/fallback are decoder-side")
            if not callable(getattr(cls, "select", None)):
                raise RegistrationError(f"{name} ({where}): a vision-side method needs select(ctx, n_keep)")
        else:
            if not callable(getattr(cls, "select", None)):
                raise RegistrationError(f"{name} ({where}): a decoder-side method needs select(ctx) (and `layers`)")
            if budget_knob is not None:
                if not callable(getattr(cls, "layer_tokens", None)):
                    raise RegistrationError(
                        f"{name} ({where}): budget_knob={budget_knob!r} needs a cost model to solve it against: a "
                        "static layer_tokens(num_layers, n_visual, text_tokens, **args) -> [(n_A, n_P)] per layer")
                if params is not None and budget_knob not in params:
                    raise RegistrationError(f"{name} ({where}): budget_knob {budget_knob!r} is not an argument of "
                                            f"{cls.__qualname__}.__init__ ({', '.join(sorted(params))})")
                if budget_arg is not None:
                    raise RegistrationError(f"{name}: give budget_knob (solved) or budget_arg (fitted), not both")
        for arg in entry_args or {}:
            if params is not None and arg not in params:
                raise RegistrationError(f"{name} ({where}): entry argument {arg!r} is not an argument of "
                                        f"{cls.__qualname__}.__init__")
        info = MethodInfo(
            name, kind, cls, budget_knob=budget_knob, knob_range=None if knob_range is None else tuple(knob_range),
            budget_arg=budget_arg, args=dict(args or {}), fallback=tuple(dict(f) for f in fallback),
            entry_args=dict(entry_args or {}), selection_cost=selection_cost, source=_SOURCE.get("current", "builtin"),
        )
        old = _REGISTRY.get(name)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RegistrationError(f"method name {name!r} is taken by {old.cls.__module__}.{old.cls.__qualname__} "
                                    f"({old.source}); pick another name for {where}")
        _REGISTRY[name] = info  # the same class again (a module re-imported): the newer definition
        return cls

    return decorate


_SOURCE: dict[str, str] = {}  # set by vlmeval_dop.plugins while it imports a plugin module


def init_params(cls: type) -> set[str] | None:
    """The constructor's argument names; None if it takes **kwargs (anything goes)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n in sig.parameters if n != "self"}


_DISCOVERED = False


def discover() -> None:
    """Register the built-in methods (import the packages) and those of installed packages' entry points
    (group `vlmeval_dop.methods`); once per process."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True  # set first: a plugin asking the registry while it is imported does not recurse
    import importlib

    try:
        importlib.import_module("vlmeval_dop.reducers")
        importlib.import_module("vlmeval_dop.baselines")
        from .plugins import load_entry_points

        load_entry_points()
    except BaseException:  # a broken entry point fails every call, never a silently partial registry
        _DISCOVERED = False
        raise


def registered(kind: str | None = None) -> dict[str, MethodInfo]:
    """Every registered method (of `kind`), by name, in registration order."""
    discover()
    return {n: m for n, m in _REGISTRY.items() if kind is None or m.kind == kind}


def method_info(name: str) -> MethodInfo:
    """The registration of method `name`; KeyError naming the registered ones."""
    methods = registered()
    if name not in methods:
        raise KeyError(f"method {name!r} is not registered; registered: {', '.join(sorted(methods))} (a method of "
                       "your own: @register_method in a module given to --plugins, see docs/adding_a_baseline.md)")
    return methods[name]


def seeded_methods() -> list[str]:
    """Names of the methods that take a seed entry argument."""
    return sorted(n for n, m in registered().items() if m.takes_seed)


class MethodView(Mapping):
    """A read-only, live name -> class (or adapter) mapping over the methods of one kind: what
    `vlmeval_dop.reducers.REDUCERS` and `vlmeval_dop.baselines.DECODER_PRUNERS` / `BASELINES` are now."""

    def __init__(self, kind: str, adapt: Callable[[MethodInfo], Any] | None = None):
        self.kind, self.adapt = kind, adapt

    def _methods(self) -> dict[str, MethodInfo]:
        discover()  # entry-point methods too (the built-ins are registered when these packages are imported)
        return {n: m for n, m in _REGISTRY.items() if m.kind == self.kind}

    def __getitem__(self, name: str):
        info = self._methods()[name]
        return info.cls if self.adapt is None else self.adapt(info)

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods())

    def __len__(self) -> int:
        return len(self._methods())

    def __repr__(self) -> str:
        return f"MethodView({self.kind!r}: {', '.join(self)})"


__all__ = ["KINDS", "MethodInfo", "MethodView", "RegistrationError", "discover", "method_info", "register_method",
           "registered", "seeded_methods"]
