"""Joint divergences ``D(d_A, d_P, n_v)`` of many policies per sample, with prefix sharing (App. F.3 grid
search, App. E.1 / Table 7 Spearman check).

Where the profile (profile.py) varies one parameter at a time, here every policy of a set is run as a
whole. Policies with the same ``n_v`` share work, exactly:

- the reduced run ``(L, L, n_v)`` is computed once per ``n_v`` (vision tower, projector and embedding once
  per sample; the reducer's scores once per sample through the reducer cache);
- ``(L, d_P, n_v)`` replays its layers ``< d_P`` from it;
- ``(d_A, d_P, n_v)`` with ``d_A < L`` (effective form, ``d_P <= d_A - 1``) replays layers ``< d_A`` from
  ``(L, d_P, n_v)``: below ``d_P`` both are the reduced run, in ``d_P .. d_A - 2`` both run the visual tokens
  in attention only, and at ``d_A - 1`` its visual tokens are keys/values only, whose outputs nobody reads;
  only layers ``d_A .. L-1`` run, on the text tokens;
- every run computes the last layer at the last position only, and takes the keys/values of the tokens
  before the image from the unpruned run's cache (`FrozenTokens`: nothing before them changes).

`joint_naive` is the plain procedure (one full forward per policy) and the tests' reference. Results are
per sample, resumable and shardable like the profile (`JointRun`: `joint.rank<r>.jsonl`, one line per
sample and batch of newly computed policies, keyed like the profile's records).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..arch import ArchSpec
from ..executor import apply_dop
from ..executor.families import adapter_for
from ..policy import DOPPolicy
from .divergence import TopKReference
from .profile import ProfileCounter, RankFiles, capture_full_run, code_version


def policy_key(policy: DOPPolicy) -> str:
    """`"d_A,d_P,n_v"` (n_v `all` for None): how records name a policy."""
    return f"{policy.d_A},{policy.d_P},{'all' if policy.n_v is None else policy.n_v}"


@contextmanager
def _capturing(model):
    """Record every decoder layer's output of the forward run inside the block into the yielded list."""
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in adapter_for(model).decoder_layers(model)]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def joint_batch(
    model,
    inputs: dict[str, Any],
    policies: Sequence[DOPPolicy],
    reducer: str | None,
    counter: ProfileCounter | None = None,
) -> dict[DOPPolicy, torch.Tensor]:
    """Per-sample joint divergence (Eq. 10 against the unpruned run) of each policy, with prefix sharing.

    Policies are taken as their effective forms (identical outputs); visual-only policies (no system
    depths). Returns {policy as given: (B,) float64}.
    """
    spec = ArchSpec.from_model(model)
    L = spec.num_layers
    B, n_tok = inputs["input_ids"].shape
    if any(p.has_system_depths for p in policies):
        raise ValueError("joint divergences are measured for visual-token policies (d_A, d_P, n_v) only")
    eff = {p: p.validate(L).effective(L) for p in policies}
    full = capture_full_run(model, inputs, frozen=True)
    if counter is not None:
        counter.add(spec, [[(n_tok, n_tok)] * B] * L, n_tok)
    ref = TopKReference.from_logits(full.logits)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    reducer_cache: dict[str, Any] = {}
    values: dict[DOPPolicy, torch.Tensor] = {}

    def run(policy: DOPPolicy, source: list[torch.Tensor] | None, prefix: int, capture: bool):
        """Run `policy` replaying layers < prefix from `source`; returns its layer outputs if `capture`."""
        with apply_dop(model, policy, reducer=reducer if policy.n_v is not None else None) as handle:
            with torch.no_grad(), (_capturing(model) if capture else nullcontext()) as outs:
                logits = handle.run_decoder(
                    full.decoder_kwargs, inputs["input_ids"], replay={i: source[i] for i in range(prefix)},
                    model_inputs=model_inputs, reducer_cache=reducer_cache, check_replay=False,
                    frozen=full.frozen, last_position_only=True, padding_mask=inputs.get("attention_mask"),
                )
        if counter is not None:
            counter.add_work(spec, handle.last_sample_layer_work, n_tok)
        values[policy] = ref.kl_logits(logits).per_sample
        return outs

    by_nv: dict[int | None, set[DOPPolicy]] = {}
    for p in set(eff.values()):
        by_nv.setdefault(p.n_v, set()).add(p)
    for n_v in sorted(by_nv, key=lambda n: float("inf") if n is None else n, reverse=True):
        group = by_nv[n_v]
        if n_v is None:  # the unpruned run itself
            base = full.layer_outputs
            values[DOPPolicy(L, L, None)] = torch.zeros(B, dtype=torch.float64)
        else:
            base = run(DOPPolicy(L, L, n_v), None, 0, capture=True)
        # (L, d_P, n_v) for every MLP depth in use: a point itself, or the source of (d_A < L, d_P, n_v)
        for d_P in sorted({p.d_P for p in group if p.d_P < L and p.d_A > 0}):
            suffix = sorted((p for p in group if 0 < p.d_A < L and p.d_P == d_P), key=lambda q: q.d_A)
            source = run(DOPPolicy(L, d_P, n_v), base, d_P, capture=bool(suffix))
            for p in suffix:
                run(p, source, p.d_A, capture=False)
            del source
        for p in group:  # (0, 0, n_v): no layer shares anything with another policy
            if p not in values:
                run(p, base, 0, capture=False)
        del base
    return {p: values[eff[p]] for p in policies}


def joint_naive(model, inputs: dict[str, Any], policies: Sequence[DOPPolicy], reducer: str | None,
                counter: ProfileCounter | None = None) -> dict[DOPPolicy, torch.Tensor]:
    """The plain procedure: one full forward (vision tower included) per policy, as given (not its
    effective form), no sharing. The reference `joint_batch` is tested against."""
    spec = ArchSpec.from_model(model)
    B, n_tok = inputs["input_ids"].shape
    with torch.no_grad():
        ref = TopKReference.from_logits(model(**inputs, use_cache=False).logits[:, -1])
    out = {}
    for p in policies:
        with apply_dop(model, p, reducer=reducer if p.n_v is not None else None) as handle, torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, -1]
        if counter is not None:
            counter.add_work(spec, handle.last_sample_layer_work, n_tok)
        out[p] = ref.kl_logits(logits).per_sample
    return out


@dataclass
class JointRun(RankFiles):
    """A resumable, shardable measurement of joint divergences under `out_dir` (`joint.rank<r>.jsonl`).

    A record is `{"id", "D": {policy_key: divergence}, "key"}`; a sample may have several records (each
    run appends the policies it newly computed: another budget's grid adds to the same samples), and a
    policy is computed once per sample. Keys as the profile's: sampling settings (reducer, code version)
    plus the caller's per-sample key (model, weights, dataset row, inputs).
    """

    FILE_PREFIX = "joint"
    out_dir: Path
    reducer: str | None
    rank: int = 0
    world_size: int = 1
    counter: ProfileCounter = field(default_factory=ProfileCounter)
    sample_keys: Mapping[str, str] | None = None

    def settings(self) -> Any:
        return {"objective": "kl", "joint": True, "reducer": self.reducer, "code": code_version()}

    def done_policies(self) -> dict[str, set[str]]:
        """{sample id: keys of the policies finished with the current record key} over every rank's file."""
        from ..fileio import RecordFile

        done: dict[str, set[str]] = {}
        for path in Path(self.out_dir).glob(f"{self.FILE_PREFIX}.rank*.jsonl"):
            for record, _ in RecordFile(path).read()[0]:
                sid = str(record["id"])
                if record.get("key") == self.record_key(sid):
                    done.setdefault(sid, set()).update(record.get("D", {}))
        return done

    def run(self, model, batches: Iterable[tuple[list[str], dict[str, Any]]], policies: Sequence[DOPPolicy],
            total: int | None = None) -> int:
        """Measure every policy not yet finished for each sample of this rank's batches; returns the number
        of (sample, policy) values added."""
        self.resume()
        have = self.done_policies()
        added = 0
        for ids, inputs in tqdm(batches, total=total, desc="joint divergences", unit="batch"):
            need = [p for p in policies if any(policy_key(p) not in have.get(i, ()) for i in ids)]
            if not need:
                continue
            out = joint_batch(model, inputs, need, self.reducer, self.counter)
            for b, sid in enumerate(ids):
                new = {policy_key(p): float(out[p][b]) for p in need if policy_key(p) not in have.get(sid, ())}
                if new:  # one whole line per sample and batch: survives an interruption
                    self.write_record({"id": sid, "D": new})
                    have.setdefault(sid, set()).update(new)
                    added += len(new)
        return added


def merge_joint(out_dir: Path, policies: Sequence[DOPPolicy], expected: Mapping[str, str]) -> dict[str, Any]:
    """Mean joint divergence of each policy over exactly the `expected` samples ({id: record key}), and
    the per-sample values; a missing (sample, policy) is an error naming it (rerun to compute it)."""
    from ..fileio import RecordFile

    per: dict[str, dict[str, float]] = {}
    for path in sorted(Path(out_dir).glob(f"{JointRun.FILE_PREFIX}.rank*.jsonl")):
        for r, _ in RecordFile(path).read()[0]:
            sid = str(r["id"])
            if expected.get(sid) == r.get("key"):
                per.setdefault(sid, {}).update(r.get("D", {}))
    ids = sorted(expected)
    keys = [policy_key(p) for p in policies]
    for sid in ids:
        missing = [k for k in keys if k not in per.get(sid, {})]
        if missing:
            raise RuntimeError(f"joint divergence of policy ({missing[0]}) missing for sample {sid} under {out_dir}; "
                               "rerun the same command to compute it")
    mean = {k: float(torch.tensor([per[i][k] for i in ids], dtype=torch.float64).mean()) for k in keys}
    return {"ids": ids, "mean": mean, "per_sample": {k: [per[i][k] for i in ids] for k in keys}}
