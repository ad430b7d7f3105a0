"""Profiling the individual divergence curves D_A(d_A), D_P(d_P), D_v(n_v) (paper Sec. 3.2.2, App. C.1).

The paper evaluates 3I+1 full model runs per sample (each curve varies one parameter with the others at
full). We compute the same numbers with much less work:

- the vision tower, projector and embedding run once per sample: every variant re-enters at the
  decoder stack with the captured decoder inputs (`DOPHandle.run_decoder`);
- prefix sharing: under `(d, L, N_v)` and `(L, d, N_v)` layers `0..d-1` compute exactly what the unpruned
  run computed, so their outputs are replayed from it and only layers `d..L-1` run (those on fewer tokens);
- at a `D_P` point `d`, layer `d` is replayed as well (its pruned group's outputs are the unpruned run's
  post-attention residual, the others' its outputs);
- the last layer runs the last position only (the divergence reads the first token's logits);
- the tokens before the first image have the same keys/values in every variant that does not prune them
  (causal attention): taken once per sample from the unpruned run's cache, never recomputed;
- reducer scores are shared across all `n_v` points of a sample through the reducer cache;
- samples are batched (left padding) and sdpa is used when the model was loaded with it.

With `system=True` the Eq. 14 curves `D_A_sys`, `D_P_sys` (system-token depths at the same points) are
profiled too. `ProfileCounter` counts decoder-layer forwards and their FLOP-weighted equivalent (a layer on
fewer tokens, queries or keys costs proportionally less), so the saving is a number. `profile_naive` is the
paper's procedure (one full forward per point, vision included) and the independent reference the tests
compare against.

Results are written per sample to `<out_dir>/samples.rank<r>.jsonl` as they finish; a rerun skips the
samples already there (resume), and `merge_samples` averages them into the profile. Every record carries a
`key`: a fingerprint of everything that determines it (sampling points, reducer, this code's version and
the caller's per-sample key: model and weights, dataset row, model inputs, decoding settings). A record
whose key differs from the current one is never reused: that sample is computed again. Records are
appended as whole lines (fileio.RecordFile): a line torn by a kill or a full disk is dropped on the next
run and its sample computed again.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..arch import ArchSpec
from ..executor import apply_dop
from ..executor.cache import DOPCache
from ..executor.families import adapter_for
from ..flops import layer_flops
from ..policy import DOPPolicy
from .divergence import TopKReference

CURVES = ("D_A", "D_P", "D_v")
SYSTEM_CURVES = ("D_A_sys", "D_P_sys")  # Eq. 14 (App. F.6): the same depths for the tokens before the image


@dataclass
class ProfileCounter:
    """Work done by a profile: decoder-layer forwards and their FLOP-weighted equivalent."""

    layer_forwards: int = 0
    layer_equivalents: float = 0.0  # sum over computed layers of FLOPs / FLOPs of an unpruned layer
    model_runs: int = 0  # per sample: a batch of B counts B runs
    flops_spec: ArchSpec | None = None  # weigh by these layer shapes instead of the model's (narrow stand-ins)

    def add(self, spec: ArchSpec, sample_layer_tokens: Sequence[Sequence[tuple[int, int]]], full_tokens: int) -> None:
        """Count one batched run from per-layer, per-sample `(n_attn, n_mlp)` (a sample-layer = one forward)."""
        self.add_work(spec, [[(a, a, a, m) for a, m in layer] for layer in sample_layer_tokens], full_tokens)

    def add_work(self, spec: ArchSpec, sample_layer_work: Sequence[Sequence[tuple[int, int, int, int]]],
                 full_tokens: int) -> None:
        """Count one batched run from per-layer, per-sample `(queries, keys/values projected, keys, MLP
        tokens)` (`DOPHandle.last_sample_layer_work`): keys/values-only and frozen tokens cost what they do."""
        spec = self.flops_spec or spec
        full = layer_flops(spec, full_tokens, full_tokens)
        for layer in sample_layer_work:
            for n_q, n_kv, n_keys, n_m in layer:
                if n_q or n_kv or n_m:
                    self.layer_forwards += 1
                    # layer_flops counts the scores of n_q queries over the n_kv projected keys; frozen keys add theirs
                    f = layer_flops(spec, n_kv, n_m, n_kv - n_q) + 4.0 * n_q * (n_keys - n_kv) * spec.q_dim
                    self.layer_equivalents += f / full
        self.model_runs += len(sample_layer_work[0]) if sample_layer_work else 0


@dataclass
class FullRun:
    """What the unpruned model computed for a batch: decoder inputs, every layer's output, logits.

    `mids`: {layer: post-attention residual} (the input of the layer's MLP norm) of the layers asked for;
    `frozen`: the tokens before each sample's first image with every layer's keys/values (`FrozenTokens`),
    None when asked not to keep them or when no sample has such tokens.
    """

    decoder_kwargs: dict[str, Any]
    layer_outputs: list[torch.Tensor]
    logits: torch.Tensor  # (B, V) first generated token
    mids: dict[int, torch.Tensor] = field(default_factory=dict)
    frozen: Any = None


def system_mask(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N) bool: the real tokens before each sample's first image token (the system group of Eq. 14)."""
    from ..executor.core import DOPHandle

    visual = torch.isin(input_ids, torch.tensor(adapter_for(model).image_token_ids(model), device=input_ids.device))
    pad = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
    return DOPHandle._system_mask(visual, pad)


def capture_full_run(model, inputs: dict[str, Any], mid_layers: Iterable[int] = (), frozen: bool = False) -> FullRun:
    """Run the stock model once, recording its decoder-stack inputs and each decoder layer's output.

    `mid_layers`: also record those layers' post-attention residual. `frozen`: also keep the keys/values of
    the tokens before the first image from the run's own cache (no extra computation).
    """
    adapter = adapter_for(model)
    lm = adapter.language_model(model)
    layers = adapter.decoder_layers(model)
    captured: dict[str, Any] = {}
    outputs: list[torch.Tensor] = []
    mids: dict[int, torch.Tensor] = {}

    def grab_inputs(module, args, kwargs):
        captured.update(kwargs)

    def grab_output(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    def grab_mid(i):
        def hook(module, args):
            mids[i] = args[0]

        return hook

    hooks = [lm.register_forward_pre_hook(grab_inputs, with_kwargs=True)]
    hooks += [layer.register_forward_hook(grab_output) for layer in layers]
    hooks += [adapter.mlp_input_norm(layers[i]).register_forward_pre_hook(grab_mid(i)) for i in set(mid_layers)]
    # a cache of full layers: sliding-window layers (Gemma 3) would keep only their window's keys
    cache = DOPCache(config=lm.config) if frozen else None
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=frozen, logits_to_keep=1, **({"cache": cache} if frozen else {}))
    finally:
        for h in hooks:
            h.remove()
    captured.pop("cache", None)
    logits = out.logits[:, -1]
    n = inputs["input_ids"].shape[1]
    mids = {i: m for i, m in mids.items() if m.shape[1] == n}  # whole-sequence residuals only
    tokens = None
    if frozen:
        from ..executor import FrozenTokens

        mask = system_mask(model, inputs["input_ids"], inputs.get("attention_mask"))
        if bool(mask.any()):
            tokens = FrozenTokens.from_mask(mask, [(c.keys, c.values) for c in out.cache.layers])
    return FullRun(dict(captured), outputs, logits, mids, tokens)


def curve_policies(num_layers: int, depths: Sequence[int], visual: Sequence[int],
                   system: bool = False) -> dict[str, list[DOPPolicy]]:
    """The 3I policies of the individual curves: each parameter varied with the others at full; with
    `system`, also the system-token depths (Eq. 14) with everything else at full."""
    L = num_layers
    out = {
        "D_A": [DOPPolicy(d, L, None) for d in depths],
        "D_P": [DOPPolicy(L, d, None) for d in depths],
        "D_v": [DOPPolicy(L, L, n) for n in visual],
    }
    if system:
        out["D_A_sys"] = [DOPPolicy(L, L, None, d, L) for d in depths]
        out["D_P_sys"] = [DOPPolicy(L, L, None, L, d) for d in depths]
    return out


IMAGE_SIDE_REDUCERS = ("resize",)  # reduce before the processor (DOP_R): D_v runs the model on resized inputs


def unpruned_prefix(policy: DOPPolicy, num_layers: int) -> int:
    """Leading layers whose outputs, wherever a later layer reads them, equal the unpruned run's.

    Per group (visual, system): up to its effective MLP depth, and through layer `d_A - 1` when that layer
    is keys/values only and nothing before it is pruned (its pruned tokens' outputs are read by nobody).
    A reduced visual set (`n_v`) changes every layer.
    """
    L = num_layers
    if policy.n_v is not None:
        return 0
    eff = policy.effective(L)
    groups = [(eff.d_A, eff.d_P)]
    if eff.has_system_depths:
        groups.append((eff.d_A_sys if eff.d_A_sys is not None else L, eff.d_P_sys if eff.d_P_sys is not None else L))
    prefix = L
    for d_A, d_P in groups:
        shared = d_A if d_A < L and d_P >= d_A - 1 else d_P
        prefix = min(prefix, d_A, shared)
    return prefix


def _mlp_only_depth(policy: DOPPolicy, num_layers: int) -> tuple[str, int] | None:
    """("visual"|"system", d) when the policy prunes only one group's MLP from layer d on (a D_P curve point):
    layer d's outputs are then known from the unpruned run (that group: its post-attention residual)."""
    L = num_layers
    vis_mlp = policy.n_v is None and policy.d_A >= L and policy.d_P < L
    sys_a = policy.d_A_sys is None or policy.d_A_sys >= L
    sys_p = policy.d_P_sys is None or policy.d_P_sys >= L
    if vis_mlp and sys_a and sys_p:
        return "visual", policy.d_P
    if policy.n_v is None and policy.d_A >= L and policy.d_P >= L and sys_a and not sys_p:
        return "system", policy.d_P_sys
    return None


def _profile_curves(model, inputs, policies, reducer, counter, base_logits, run_variant, resized=None):
    """Shared loop of both procedures: every curve policy, its divergence from `base_logits`, counted.

    `run_variant(handle, policy)` returns the variant's last-position logits under the installed policy.
    With an image-side reducer (`resize`), the `D_v` point `n` is the stock model on `resized[n]`, the same
    samples with their images resized for about `n` visual tokens (the wrapper's DOP_R inputs).
    """
    spec = ArchSpec.from_model(model)
    L = spec.num_layers
    B, n_tok = inputs["input_ids"].shape
    image_side = reducer in IMAGE_SIDE_REDUCERS
    visual = [p.n_v for p in policies.get("D_v", [])]
    if image_side and (resized is None or any(n not in resized for n in visual)):
        raise ValueError(f"reducer {reducer!r} reduces the image: give the inputs resized for every n_v in {visual}")
    if counter is not None:  # the unpruned run
        counter.add(spec, [[(n_tok, n_tok)] * B] * L, n_tok)
    ref = TopKReference.from_logits(base_logits)
    result: dict[str, torch.Tensor] = {}
    for curve, points in policies.items():
        values = []
        for policy in points:
            if image_side and policy.n_v is not None:
                small = resized[policy.n_v]
                with torch.no_grad():
                    logits = model(**small, use_cache=False, logits_to_keep=1).logits[:, -1]
                if counter is not None:
                    n_small = small["input_ids"].shape[1]
                    counter.add(spec, [[(n_small, n_small)] * B] * L, n_tok)
            else:
                with apply_dop(model, policy, reducer=reducer if policy.n_v is not None else None) as handle:
                    with torch.no_grad():
                        logits = run_variant(handle, policy)
                if counter is not None:
                    counter.add_work(spec, handle.last_sample_layer_work, n_tok)
            values.append(ref.kl_logits(logits).per_sample)
        result[curve] = torch.stack(values, dim=1)
    return result


def profile_batch(
    model,
    inputs: dict[str, Any],
    depths: Sequence[int],
    visual: Sequence[int],
    reducer: str | None,
    counter: ProfileCounter | None = None,
    resized: Mapping[int, dict[str, Any]] | None = None,
    system: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-sample divergences of one batch at every sampling point, computed with less work than the
    paper's 3I+1 runs and the same numbers (tests: equal to `profile_naive`):

    - prefix sharing: the layers before the pruning depth are replayed from the unpruned run
      (`unpruned_prefix`), the keys/values-only layer `d_A - 1` included;
    - at a `D_P` point `d`, layer `d` itself is replayed too: its other tokens' outputs are the unpruned
      run's, and the pruned group's are the unpruned run's post-attention residual (no MLP);
    - the last layer computes the last position only (`run_decoder(last_position_only=True)`);
    - the tokens before the first image are the same in every variant that does not prune them (causal
      attention): their keys/values are taken from the unpruned run's cache and never recomputed
      (`FrozenTokens`).

    `resized` ({n_v: inputs}) is needed by image-side reducers (`resize`, DOP_R) only; `system` adds the
    Eq. 14 system-token curves. Returns {"D_A": (B, len(depths)), "D_P": (B, len(depths)),
    "D_v": (B, len(visual)) [, "D_A_sys", "D_P_sys"]} float64.
    """
    L = ArchSpec.from_model(model).num_layers
    policies = curve_policies(L, depths, visual, system)
    full = capture_full_run(model, inputs, mid_layers=[d for d in depths if d < L], frozen=True)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    reducer_cache: dict[str, Any] = {}  # reducer scores shared by all n_v points of this batch
    groups = {"visual": torch.isin(inputs["input_ids"], torch.tensor(
        adapter_for(model).image_token_ids(model), device=inputs["input_ids"].device))}
    if system:
        groups["system"] = system_mask(model, inputs["input_ids"], inputs.get("attention_mask"))

    def variant(handle, policy: DOPPolicy) -> torch.Tensor:
        prefix = unpruned_prefix(policy, L)
        replay = {i: full.layer_outputs[i] for i in range(prefix)}
        check = True
        mlp_only = _mlp_only_depth(policy, L)
        if mlp_only is not None and mlp_only[1] == prefix and prefix in full.mids:
            group = groups[mlp_only[0]][..., None].to(full.mids[prefix].device)
            replay[prefix] = torch.where(group, full.mids[prefix], full.layer_outputs[prefix])
            check = False  # layer d is pruned: its outputs are known, not unpruned
        return handle.run_decoder(
            full.decoder_kwargs,
            inputs["input_ids"],
            replay=replay,
            model_inputs=model_inputs,
            reducer_cache=reducer_cache,
            check_replay=check,
            frozen=None if policy.has_system_depths else full.frozen,
            last_position_only=True,
            padding_mask=inputs.get("attention_mask"),
        )

    return _profile_curves(model, inputs, policies, reducer, counter, full.logits, variant, resized)


def profile_naive(
    model,
    inputs: dict[str, Any],
    depths: Sequence[int],
    visual: Sequence[int],
    reducer: str | None,
    counter: ProfileCounter | None = None,
    resized: Mapping[int, dict[str, Any]] | None = None,
    system: bool = False,
) -> dict[str, torch.Tensor]:
    """The paper's procedure: 3I+1 independent full forwards (vision tower included), no sharing."""
    with torch.no_grad():
        base = model(**inputs, use_cache=False).logits[:, -1]
    L = ArchSpec.from_model(model).num_layers
    return _profile_curves(
        model, inputs, curve_policies(L, depths, visual, system), reducer, counter, base,
        lambda handle, policy: model(**inputs, use_cache=False).logits[:, -1], resized,
    )


SAMPLES_PATTERN = "samples.rank*.jsonl"

# Bump when the profiling procedure changes what a record holds; divergence.py's source is hashed as well
# (search/divergence.py: the KL of Eq. 10), so editing it invalidates cached samples automatically.
PROFILE_VERSION = 3  # 3: last position only, frozen pre-image tokens, D_P layer replay (same values)


def code_version(*modules) -> str:
    """Fingerprint of this package's record format and the source of `modules` (default: divergence.py)."""
    import inspect

    from . import divergence
    from ..fileio import fingerprint

    return fingerprint(PROFILE_VERSION, [inspect.getsource(m) for m in (modules or (divergence,))])


class RankFiles:
    """Per-rank sample files of a resumable, shardable job: `<out_dir>/<FILE_PREFIX>.rank<r>.jsonl`, one JSON
    record with an "id" and a "key" per finished sample. Subclasses are dataclasses with `out_dir`, `rank`,
    `world_size`, `sample_keys` and a `settings()` method (what, apart from the sample, determines a record).

    Attributes set by `resume()`: `stale` (records of this run's samples computed under another key, which
    are computed again) and `torn` (incomplete lines dropped).
    """

    FILE_PREFIX = "samples"
    out_dir: Path
    rank: int
    world_size: int
    sample_keys: Mapping[str, str] | None

    @property
    def samples_file(self) -> Path:
        return Path(self.out_dir) / f"{self.FILE_PREFIX}.rank{self.rank}.jsonl"

    def settings(self) -> Any:
        raise NotImplementedError

    def record_key(self, sample_id: str) -> str:
        """The key a record of `sample_id` must carry to be reused: settings + the caller's sample key."""
        from ..fileio import fingerprint

        if not hasattr(self, "_settings_key"):
            self._settings_key = fingerprint(self.FILE_PREFIX, self.settings())
        sample = None if self.sample_keys is None else self.sample_keys.get(sample_id)
        return fingerprint(self._settings_key, sample)

    def expected_keys(self, ids: Iterable[str]) -> dict[str, str]:
        """{id: record key} of these samples (what `merge_samples(expected=...)` takes)."""
        return {i: self.record_key(i) for i in ids}

    def resume(self) -> set[str]:
        """Ids whose finished record (any rank's file) matches its current key. This rank's own file is
        first rewritten without torn lines and without records that do not match (computed again)."""
        from ..fileio import RecordFile

        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        own = RecordFile(self.samples_file)
        records, self.torn = own.read()
        keep, self.stale = [], 0
        for record, raw in records:
            if record.get("key") == self.record_key(str(record["id"])):
                keep.append(raw)
            elif self.sample_keys is None or str(record["id"]) in self.sample_keys:
                self.stale += 1
        if self.torn or len(keep) != len(records):
            own.rewrite(keep)
        if self.torn:
            _warn(f"{own.path}: dropped {self.torn} incomplete record(s) (an interrupted write); "
                  "those samples are computed again")
        if self.stale:
            _warn(f"{own.path}: {self.stale} finished sample(s) were computed with other settings or data (model, "
                  "weights, dataset row, sampling points, reducer, decoding or code version) and are computed again")
        return self.finished_ids()

    def finished_ids(self) -> set[str]:
        """Sample ids already finished by any rank with the current key (read only)."""
        from ..fileio import RecordFile

        done = set()
        for path in Path(self.out_dir).glob(f"{self.FILE_PREFIX}.rank*.jsonl"):
            for record, _ in RecordFile(path).read()[0]:
                if record.get("key") == self.record_key(str(record["id"])):
                    done.add(str(record["id"]))
        return done

    def write_record(self, record: dict) -> None:
        """Append one finished sample (with its key) as a whole line."""
        from ..fileio import RecordFile

        RecordFile(self.samples_file).append({**record, "key": self.record_key(str(record["id"]))})

    def shard(self, items: Sequence[Any]) -> Iterator[Any]:
        """This rank's slice of `items` (every world_size-th, starting at rank)."""
        return iter(items[self.rank :: self.world_size])


def _warn(msg: str) -> None:
    tqdm.write(f"vlmeval-dop: {msg}", file=sys.stderr)


@dataclass
class ProfileRun(RankFiles):
    """A resumable profiling job writing per-sample results under `out_dir`.

    Attributes:
        out_dir: one directory per (model, reducer, dataset, samples, seed).
        rank, world_size: this process's shard (torchrun: each rank profiles samples i % world == rank).
        sample_keys: {sample id: fingerprint of what determines it besides the points and reducer}
            (search/run.py: model, weights, dataset row, model inputs); None keys by id alone.
        system: also profile the system-token curves D_A_sys, D_P_sys (Eq. 14) at `depths`.
    """

    out_dir: Path
    depths: list[int]
    visual: list[int]
    reducer: str | None
    rank: int = 0
    world_size: int = 1
    counter: ProfileCounter = field(default_factory=ProfileCounter)
    sample_keys: Mapping[str, str] | None = None
    system: bool = False

    def settings(self) -> Any:
        return {"objective": "kl", "depths": list(self.depths), "visual": list(self.visual),
                "reducer": self.reducer, "code": code_version(), "system": self.system}

    @property
    def curves(self) -> tuple[str, ...]:
        return CURVES + (SYSTEM_CURVES if self.system else ())

    def run(self, model, batches: Iterable[tuple[list[str], dict[str, Any]]], total: int | None = None) -> int:
        """Profile every batch `(sample_ids, inputs)` of this rank's shard not yet done; returns samples added.

        With an image-side reducer a batch is `(sample_ids, inputs, {n_v: resized inputs})`."""
        done = self.resume()
        added = 0
        for ids, inputs, *resized in tqdm(batches, total=total, desc="profiling", unit="batch"):
            if all(i in done for i in ids):
                continue
            out = profile_batch(model, inputs, self.depths, self.visual, self.reducer, self.counter,
                                resized[0] if resized else None, system=self.system)
            for b, sid in enumerate(ids):
                if sid in done:
                    continue
                # one whole line per finished sample: it survives an interruption
                self.write_record({"id": sid, **{c: [float(v) for v in out[c][b].tolist()] for c in self.curves}})
                added += 1
        return added


def merge_samples(out_dir: Path, pattern: str = SAMPLES_PATTERN,
                  expected: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Average every rank's per-sample results (files `pattern` under `out_dir`); sample order does not
    matter (sorted by id).

    `expected` ({id: record key}, `RankFiles.expected_keys`): exactly these samples, each from a record with
    that key (records of other samples or settings in the folder are ignored); one missing is an error.
    """
    from ..fileio import RecordFile

    records: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob(pattern)):
        for r, _ in RecordFile(path).read()[0]:
            sid = str(r["id"])
            if expected is None or expected.get(sid) == r.get("key"):
                records[sid] = r
    if expected is not None:
        missing = sorted(set(expected) - set(records))
        if missing:
            raise RuntimeError(f"{len(missing)} profiled sample(s) missing under {out_dir} (e.g. {missing[0]}); "
                               "rerun the same command to compute them")
    if not records:
        raise FileNotFoundError(f"no profiled samples under {out_dir}")
    ids = sorted(records)
    curves = [c for c in CURVES + SYSTEM_CURVES if all(c in records[i] for i in ids)]
    means = {}
    for c in curves:
        t = torch.tensor([records[i][c] for i in ids], dtype=torch.float64)
        means[c] = [float(v) for v in t.mean(0).tolist()]
    return {"ids": ids, "per_sample": {c: [records[i][c] for i in ids] for c in curves}, "mean": means}


def build_profile(
    out_dir: Path,
    *,
    model: str,
    reducer: str,
    dataset: str,
    seed: int | None,
    num_layers: int,
    num_visual: int,
    depths: Sequence[int],
    visual: Sequence[int],
    pattern: str = SAMPLES_PATTERN,
    objective: str = "kl",
    expected: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
):
    """Merge the per-sample results under `out_dir` (files `pattern`; `expected` as in `merge_samples`) into
    a `DivergenceProfile` (curves.py) of `objective` ("kl", or "acc_drop" for accuracy.py's drops); system
    curves (D_A_sys, D_P_sys at `depths`) where every record has them. `meta` goes into the profile."""
    from .curves import profile_from_measurements

    merged = merge_samples(out_dir, pattern, expected)
    curves = list(merged["mean"])
    points = {"D_A": list(depths), "D_P": list(depths), "D_v": list(visual),
              "D_A_sys": list(depths), "D_P_sys": list(depths)}
    means = {c: dict(zip(points[c], merged["mean"][c])) for c in curves}
    per_sample = {
        c: {p: [row[j] for row in merged["per_sample"][c]] for j, p in enumerate(points[c])} for c in curves
    }
    return profile_from_measurements(
        model=model, reducer=reducer, dataset=dataset, n_samples=len(merged["ids"]), seed=seed,
        L=num_layers, N_v=num_visual, per_sample=per_sample, objective=objective, meta=dict(meta or {}), **means,
    )
