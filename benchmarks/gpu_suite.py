"""One bounded GPU suite: every GPU measurement of the project in one command, within its own time caps.

    python benchmarks/gpu_suite.py                          # one H100/H200: at most 9 minutes by its own clock
    python benchmarks/gpu_suite.py --parts latency,search --out /tmp/res
    python benchmarks/gpu_suite.py --smoke                  # CPU, the tiny models, well under a minute (CI)
    python benchmarks/gpu_suite.py --device cpu --dtype float32 --shrink 32 --total-cap 240  # the GPU code
                                                            # path on CPU at shrunk widths (a check, not numbers)

Models: stock LlavaForConditionalGeneration / LlavaNextForConditionalGeneration with random weights at the
real shapes of LLaVA-1.5-7B and LLaVA-NeXT-7B (real depth, CLIP ViT-L/14-336 tower, one 336x336 resp.
672x672 image, 135 text tokens; `reproduce/efficiency.py: build`), bf16 on CUDA. Nothing is downloaded.
`--smoke` uses the project's tiny checkpoints (`vlmeval_dop.tiny`) instead, on CPU in float32.

Parts (`--parts`, default all; each model's segment of a part is timed as it runs):

- latency:  prefill latency of DOP at the paper's policies (eval_configs/policies.yaml, uniform reducer: the
            executor alone) over the stock model's, beside the Eq. 11 and executed TFLOPs ratios; sdpa and
            eager (paper Table 3: LLaVA-NeXT-7B 44 vs 253 ms at 14 %, sdpa, A100).
- cdpruner: DOP_CD (the paper's policy, CDPruner reducing to n_v) vs CDPruner alone at the same budget
            label (n_e tokens in every layer), prefill latency (paper Table 3: 44 vs 45 ms).
- overhead: the executor at the full policy vs stock transformers, prefill and a `--decode-tokens` decode,
            interleaved pairs (target <= 2 %).
- memory:   peak CUDA memory of a prefill and of a `--decode-tokens`-token generate (timed once: Table 3's
            per-sample latency at a fixed length), DOP_CD vs the stock model.
- reducers: each reducer's selection cost (benchmarks/reducer_cost.py, random inputs of the real sizes) over
            the pruned prefill it enables on the model (n_keep tokens in every layer).
- search:   divergence-profiling time for `--search-samples` samples (ours: prefix sharing, vision once,
            batched, sdpa; CDPruner for the D_v curve as DOP_CD), plus the paper's procedure (3I+1 full
            runs, batch 1, eager) on `--naive-samples` samples; paper Table 14: 5 / 12 min on an A100 for
            100 samples, goal <= 3 min.

Time caps: each part has a cap (`--caps part=seconds,...`; defaults in CAPS) shared by its model segments,
and the whole suite a total cap (`--total-cap`, default 540 s, counted from process start: imports and
model builds included). Work is cut at the first repetition / batch boundary past its deadline and reported
as partial; work that cannot start before its deadline is reported as skipped with the reason. CUDA times
are measured with torch.cuda.Event after a synchronize, after warm-up runs, median of the repetitions. A
CUDA out-of-memory error skips that unit only (reported), the rest goes on.

Output: `<out>/<date>-<gpu>.json` (every number with its settings, written after each segment, so a killed
run leaves what it measured) and `<out>/<date>-<gpu>.md` (the tables; docs/benchmarks.md links the
committed ones). `--out` defaults to benchmarks/results (a temporary folder for --smoke).
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # the suite's clock starts before the heavy imports: they count in the total cap

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # the package from this checkout; reproduce/ and the benchmark scripts
    if _p not in sys.path:
        sys.path.insert(0, _p)

PARTS = ("latency", "cdpruner", "overhead", "memory", "reducers", "search", "throughput")
MODELS = ("llava15_7b", "llavanext_7b")
TINY_FAMILY = {"llava15_7b": "llava15", "llavanext_7b": "llavanext"}
# seconds per part (all models together); with the model builds they fit TOTAL_CAP on an H100/H200
CAPS = {"latency": 90.0, "cdpruner": 65.0, "overhead": 60.0, "memory": 45.0, "reducers": 20.0, "search": 170.0,
        "throughput": 60.0}
TOTAL_CAP = 540.0
SMOKE_CAPS = {"latency": 10.0, "cdpruner": 10.0, "overhead": 8.0, "memory": 8.0, "reducers": 6.0, "search": 12.0,
              "throughput": 15.0}
PART_MODELS = {"throughput": ("llava15_7b",)}  # parts measured on some models only (the rest: all models)
THROUGHPUT_BATCHES = (1, 8, 16)  # 1 = VLMEvalKit's own one-sample loop (issue #16's reference)
SMOKE_TOTAL_CAP = 55.0
SEARCH_BATCH = {"llava15_7b": 8, "llavanext_7b": 4}  # halved on CUDA out-of-memory
OVERHEAD_TARGET_PCT = 2.0
SEARCH_GOAL_S = 180.0
QUESTION = "What is written on the sign next to the red car? Answer the question using a single word or phrase."
# Paper reference numbers (A100-80G): Table 3 prefill ms by (model, attn) and method; Table 14 search minutes.
PAPER_PREFILL_MS = {
    ("llava15_7b", "eager"): {"full": 73, "CDPruner 0.28": 28},
    ("llava15_7b", "sdpa"): {"full": 59, "CDPruner 0.28": 26},
    ("llavanext_7b", "eager"): {"full": 494, "CDPruner 0.14": 52, "DOP_CD 0.14": 53},
    ("llavanext_7b", "sdpa"): {"full": 253, "CDPruner 0.14": 45, "DOP_CD 0.14": 44},
}
PAPER_SEARCH_MIN = {"llava15_7b": 5, "llavanext_7b": 12}
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", RuntimeError), getattr(torch.cuda, "OutOfMemoryError", RuntimeError)}
    - {RuntimeError}
)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything a run depends on (recorded in the JSON)."""

    device: str
    dtype: str
    smoke: bool = False
    shrink: int = 1
    parts: tuple[str, ...] = PARTS
    models: tuple[str, ...] = MODELS
    attn: tuple[str, ...] = ("sdpa", "eager")
    caps: dict[str, float] = field(default_factory=lambda: dict(CAPS))
    total_cap: float = TOTAL_CAP
    warmup: int = 3
    reps: int = 10
    overhead_pairs: int = 20
    decode_tokens: int = 64
    decode_pairs: int = 3
    search_samples: int = 100
    search_batch: dict[str, int] = field(default_factory=lambda: dict(SEARCH_BATCH))
    naive_samples: int = 2
    threads: int | None = None  # torch CPU threads (smoke: 1, which a loaded shared CPU runs far faster)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _caps(text: str, base: dict[str, float]) -> dict[str, float]:
    caps = dict(base)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in PARTS or not value:
            raise argparse.ArgumentTypeError(f"--caps wants part=seconds with parts from {', '.join(PARTS)}; got {item!r}")
        caps[name] = float(value)
    return caps


def _names(text: str, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or '(none)'}; valid: {', '.join(valid)}")
    return names


def parse_args(argv=None) -> tuple[Settings, Path | None]:
    """Settings from the command line (`--smoke` presets, explicit flags win) and the output folder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, small repetitions and caps (CI)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results; smoke: a temp dir)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    ap.add_argument("--shrink", type=int, default=1, help="divide every width by K, 4 layers (a CPU check of the GPU path)")
    ap.add_argument("--attn", default=None, help="attention implementations for latency/cdpruner (default sdpa,eager)")
    ap.add_argument("--caps", default="", help="per-part caps in seconds, e.g. search=120,latency=60")
    ap.add_argument("--total-cap", type=float, default=None, help="seconds for the whole suite, from process start")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --smoke, else torch's)")
    for name, kind in (("warmup", int), ("reps", int), ("overhead-pairs", int), ("decode-tokens", int),
                       ("decode-pairs", int), ("search-samples", int), ("search-batch", int), ("naive-samples", int)):
        ap.add_argument(f"--{name}", type=kind, default=None)
    a = ap.parse_args(argv)
    try:
        parts = _names(a.parts, PARTS, "part")
        models = _names(a.models, MODELS, "model")
        attn = _names(a.attn, ("sdpa", "eager"), "attention implementation") if a.attn else ("sdpa", "eager")
        caps = _caps(a.caps, SMOKE_CAPS if a.smoke else CAPS)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    device = a.device or ("cpu" if a.smoke else "cuda" if torch.cuda.is_available() else None)
    if device is None:
        ap.error("no CUDA device here: run with --smoke, or --device cpu (e.g. with --shrink 32) to check the code path")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {device}: torch sees no CUDA device")
    if a.smoke and device != "cpu":
        ap.error("--smoke runs on the CPU")
    if a.smoke and a.shrink != 1:
        ap.error("--smoke uses the tiny models; --shrink applies to the real-shape models")
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        ap.error(f"unknown --dtype {dtype}")
    s = Settings(device=device, dtype=dtype, smoke=a.smoke, shrink=max(1, a.shrink), parts=parts, models=models,
                 attn=attn, caps=caps, total_cap=SMOKE_TOTAL_CAP if a.smoke else TOTAL_CAP)
    if a.smoke:
        s.warmup, s.reps, s.overhead_pairs, s.decode_tokens, s.decode_pairs = 1, 2, 2, 4, 1
        s.search_samples, s.naive_samples = 2, 1
        s.search_batch = {m: 2 for m in MODELS}
    if a.total_cap is not None:
        s.total_cap = a.total_cap
    for name in ("warmup", "reps", "overhead_pairs", "decode_tokens", "decode_pairs", "search_samples", "naive_samples"):
        if getattr(a, name) is not None:
            setattr(s, name, max(1 if name != "warmup" else 0, getattr(a, name)))
    s.threads = a.threads if a.threads is not None else (1 if a.smoke else None)
    if a.search_batch is not None:
        s.search_batch = {m: max(1, a.search_batch) for m in MODELS}
    return s, a.out


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """A deadline on `time.perf_counter()`."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def expired(self) -> bool:
        return self.left() <= 0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call: CUDA events around it after a synchronize (so the GPU timeline from the
    first launch to the last kernel, host gaps included), or the wall clock on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def repeat_ms(fn: Callable[[], Any], s: Settings, clock: Clock, reps: int | None = None) -> dict[str, Any]:
    """`s.warmup` untimed calls, then up to `reps` timed ones; stops early (partial) once `clock` has run
    out, after at least one timed call. Returns median ms, every time, and how many ran."""
    reps = s.reps if reps is None else reps
    with torch.no_grad():
        for _ in range(s.warmup):
            fn()
            if clock.expired():
                break
        times = []
        for _ in range(reps):
            times.append(timed_ms(fn, s.device))
            if clock.expired():
                break
    return {"ms": statistics.median(times), "times_ms": [round(t, 3) for t in times], "reps": len(times),
            "partial": len(times) < reps}


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Bench:
    """One built model, its one-sample inputs and the facts the parts need."""

    key: str
    model: Any
    inputs: dict[str, Any]
    spec: Any  # ArchSpec of the built model (visual_tokens = crop tokens, the paper's N_v)
    text_tokens: int
    placeholders: int
    policies: dict[float, Any]  # budget label -> DOPPolicy at the built depth / token count
    paper_policies: dict[float, Any]
    source: str
    build_s: float
    shrink_text: int
    device: str
    dtype: torch.dtype
    image_token_ids: tuple[int, ...]
    vocab: int
    _cdpruner: Any = None

    def cdpruner(self):
        """CDPruner with a random CLIP text tower of the real shape (widths / shrink) and a fixed question."""
        if self._cdpruner is None:
            from reproduce import efficiency

            self._cdpruner = efficiency.make_reducer("cdpruner", self.model, self.shrink_text, self.device, self.dtype)
        return self._cdpruner

    def prefill(self) -> Callable[[], Any]:
        return lambda: self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def generate(self, tokens: int) -> Callable[[], Any]:
        return lambda: self.model.generate(**self.inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                                           do_sample=False, pad_token_id=0)

    def tflops(self, policy) -> dict[str, float]:
        from vlmeval_dop.flops import policy_tflops

        return policy_tflops(self.spec, policy, self.text_tokens)

    def n_e(self, budget: float) -> int:
        from vlmeval_dop.flops import uniform_tokens_for_budget

        # at least one token: on the tiny models the text alone can exceed the smallest budgets
        return max(1, uniform_tokens_for_budget(self.spec, budget, self.text_tokens))


def scale_policy(policy, paper_layers: int, layers: int, paper_visual: int, visual: int):
    """A paper policy carried to a model of another depth / visual token count (identity at the real shape)."""
    from vlmeval_dop.policy import DOPPolicy

    if layers == paper_layers and visual == paper_visual:
        return policy
    n_v = None if policy.n_v is None else max(1, min(visual, round(policy.n_v * visual / paper_visual)))
    return DOPPolicy(round(policy.d_A * layers / paper_layers), round(policy.d_P * layers / paper_layers), n_v)


def build_bench(key: str, s: Settings) -> Bench:
    """The model of `key` as the settings say: tiny checkpoint (smoke) or random weights at the real shape
    (widths / `shrink`), sdpa, on the device, with one prompt's inputs."""
    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.models_config import PAPER_POLICIES, get_model

    t0 = time.perf_counter()
    dtype = s.torch_dtype
    if s.smoke:
        from vlmeval_dop.tiny import load_tiny, tiny_inputs

        family = TINY_FAMILY[key]
        model, processor = load_tiny(family, attn_implementation="sdpa", dtype=dtype)
        model = model.to(s.device)
        batch = tiny_inputs(family, processor, [QUESTION])
        inputs = {k: (v.to(s.device, dtype) if v.is_floating_point() else v.to(s.device)) for k, v in batch.items()}
        source, shrink_text = f"tiny checkpoint vlmeval_dop.tiny:{family}", 32
    else:
        from reproduce import efficiency

        model, inputs, _ = efficiency.build(key, "sdpa", s.device, dtype, s.shrink)
        source = "random weights at the real shape" + (f", widths / {s.shrink}, 4 layers" if s.shrink > 1 else "")
        shrink_text = s.shrink
    sync(s.device)
    spec = ArchSpec.from_model(model)
    ids = inputs["input_ids"]
    image_ids = tuple(int(t) for t in spec.image_token_ids)
    placeholders = int(torch.isin(ids[0], torch.tensor(image_ids, device=ids.device)).sum())
    text_tokens = ids.shape[1] - placeholders
    paper = get_model(key)
    paper_policies = PAPER_POLICIES[key]
    policies = {b: scale_policy(p, paper.arch.num_layers, spec.num_layers, paper.arch.visual_tokens, spec.visual_tokens)
                for b, p in sorted(paper_policies.items(), reverse=True)}
    vocab = min(31000, model.config.get_text_config(decoder=True).vocab_size)
    return Bench(key=key, model=model, inputs=dict(inputs), spec=spec, text_tokens=text_tokens,
                 placeholders=placeholders, policies=policies, paper_policies=dict(paper_policies), source=source,
                 build_s=time.perf_counter() - t0, shrink_text=shrink_text, device=s.device, dtype=dtype,
                 image_token_ids=image_ids, vocab=vocab)


def set_attn(model, attn: str) -> None:
    model.set_attn_implementation(attn)


def dop(bench: Bench, policy, reducer=None):
    """apply_dop as a context manager, or nothing for the stock model (policy None)."""
    if policy is None:
        return contextlib.nullcontext()
    from vlmeval_dop import apply_dop

    return apply_dop(bench.model, policy, reducer=reducer if policy.n_v is not None else None)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PartResult:
    """What one part measured over all its model segments, and what it could not do (with why)."""

    name: str
    cap_s: float
    used_s: float = 0.0
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"what", "reason"}
    errors: list[dict] = field(default_factory=list)  # {"what", "error"}
    partial: list[str] = field(default_factory=list)  # units cut short by the cap
    segments: list[dict] = field(default_factory=list)  # {"model", "seconds", "budget_s"}

    @property
    def status(self) -> str:
        if not self.rows:
            return "error" if self.errors else "skipped"
        return "partial" if (self.skipped or self.errors or self.partial) else "ok"

    def reason(self) -> str | None:
        bits = [f"{e['what']}: {e['error']}" for e in self.errors] + [f"{k['what']}: {k['reason']}" for k in self.skipped]
        bits += [f"{p}: cut short by the cap" for p in self.partial]
        return "; ".join(bits) or None

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason(), "cap_s": self.cap_s, "seconds": round(self.used_s, 2),
                "segments": self.segments, "rows": self.rows, "skipped": self.skipped, "errors": self.errors,
                "partial": self.partial}


class Segment:
    """One part on one model: a deadline, and units that are admitted, run, and cut or skipped."""

    def __init__(self, part: PartResult, bench: Bench, clock: Clock, s: Settings) -> None:
        self.part, self.bench, self.clock, self.s = part, bench, clock, s
        self.smallest_unit: float | None = None

    def run(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one unit unless the cap leaves no room for it; a CUDA OOM or an error is recorded, not raised."""
        label = f"{self.bench.key}: {what}"
        left = self.clock.left()
        if left <= 0 or (self.smallest_unit is not None and self.smallest_unit > left):
            need = f", the smallest unit so far took {self.smallest_unit:.1f} s" if self.smallest_unit else ""
            self.part.skipped.append({"what": label, "reason": f"{self.part.name} cap reached ({max(left, 0):.1f} s left{need})"})
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except OOM_ERRORS as exc:
            free_cuda()
            self.part.skipped.append({"what": label, "reason": f"CUDA out of memory: {str(exc).splitlines()[0]}"})
            return None
        except Exception as exc:  # one broken unit must not take the suite down; the traceback goes to stderr
            traceback.print_exc()
            self.part.errors.append({"what": label, "error": f"{type(exc).__name__}: {exc}"})
            return None
        took = time.perf_counter() - t0
        self.smallest_unit = took if self.smallest_unit is None else min(self.smallest_unit, took)
        if isinstance(out, dict) and out.get("partial"):
            self.part.partial.append(label)
        return out


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


# ---------------------------------------------------------------------------------------------- parts
def part_latency(seg: Segment, full_cache: dict) -> None:
    """Prefill latency DOP (uniform reducer) / stock vs the executed TFLOPs ratio, per attention."""
    b, s = seg.bench, seg.s
    for attn in s.attn:
        set_attn(b.model, attn)
        full = seg.run(f"{attn} stock prefill", lambda: repeat_ms(b.prefill(), s, seg.clock))
        if full is None:
            continue
        full_cache[(b.key, attn)] = full
        seg.part.rows.append({"model": b.key, "attn": attn, "budget": 1.0, "policy": "stock (unpruned)",
                              "tflops_ratio": 1.0, "executed_ratio": 1.0, "prefill_ms": _r(full["ms"]),
                              "full_ms": _r(full["ms"]), "latency_ratio": 1.0, "latency_over_executed": 1.0,
                              "reps": full["reps"]})
        for budget, policy in b.policies.items():
            def unit(policy=policy):
                with dop(b, policy, "uniform"):
                    return repeat_ms(b.prefill(), s, seg.clock)

            r = seg.run(f"{attn} DOP {policy} at {budget}", unit)
            if r is None:
                continue
            tf = b.tflops(policy)
            ratio = r["ms"] / full["ms"]
            seg.part.rows.append({"model": b.key, "attn": attn, "budget": budget, "policy": str(policy),
                                  "paper_policy": str(b.paper_policies[budget]), "reducer": "uniform",
                                  "tflops_ratio": _r(tf["ratio"], 4), "executed_ratio": _r(tf["executed_ratio"], 4),
                                  "prefill_ms": _r(r["ms"]), "full_ms": _r(full["ms"]), "latency_ratio": _r(ratio, 4),
                                  "latency_over_executed": _r(ratio / tf["executed_ratio"], 3), "reps": r["reps"]})


def part_cdpruner(seg: Segment, full_cache: dict) -> None:
    """DOP_CD at the paper's policy vs CDPruner alone at the same budget label, prefill latency."""
    from vlmeval_dop.policy import DOPPolicy

    b, s = seg.bench, seg.s
    L = b.spec.num_layers
    for attn in s.attn:
        set_attn(b.model, attn)
        full = full_cache.get((b.key, attn)) or seg.run(f"{attn} stock prefill", lambda: repeat_ms(b.prefill(), s, seg.clock))
        for budget, policy in b.policies.items():
            n_e = b.n_e(budget)
            cd_policy = DOPPolicy(L, L, n_e)

            def unit(p):
                reducer = b.cdpruner()
                with dop(b, p, reducer):
                    return repeat_ms(b.prefill(), s, seg.clock)

            cd = seg.run(f"{attn} CDPruner n_v={n_e} at {budget}", lambda: unit(cd_policy))
            dc = seg.run(f"{attn} DOP_CD {policy} at {budget}", lambda: unit(policy))
            if cd is None and dc is None:
                continue
            tf_cd, tf_dc = b.tflops(cd_policy), b.tflops(policy)
            paper = PAPER_PREFILL_MS.get((b.key, attn), {}) if s.shrink == 1 and not s.smoke else {}
            seg.part.rows.append({
                "model": b.key, "attn": attn, "budget": budget,
                "cdpruner_policy": str(cd_policy), "cdpruner_tflops_ratio": _r(tf_cd["ratio"], 4),
                "cdpruner_ms": _r(cd and cd["ms"]),
                "dop_cd_policy": str(policy), "dop_cd_tflops_ratio": _r(tf_dc["ratio"], 4),
                "dop_cd_executed_ratio": _r(tf_dc["executed_ratio"], 4), "dop_cd_ms": _r(dc and dc["ms"]),
                "dop_cd_over_cdpruner": _r(dc["ms"] / cd["ms"], 3) if cd and dc else None,
                "full_ms": _r(full and full["ms"]),
                "dop_cd_over_full": _r(dc["ms"] / full["ms"], 4) if dc and full else None,
                "paper_ms": {k: v for k, v in paper.items() if k == "full" or k.endswith(f" {budget}")} or None,
                "reps": [x["reps"] if x else 0 for x in (cd, dc)],
            })


def part_overhead(seg: Segment, full_cache: dict) -> None:
    """The executor at the full policy vs stock transformers: interleaved pairs, prefill and decode."""
    from vlmeval_dop.policy import DOPPolicy

    b, s = seg.bench, seg.s
    attn = s.attn[0]
    set_attn(b.model, attn)
    full_policy = DOPPolicy.full(b.spec.num_layers)

    def pairs(fn, n: int, warmup: int) -> dict:
        stock, ours = [], []
        with torch.no_grad():
            for _ in range(warmup):
                fn()
                with dop(b, full_policy):
                    fn()
            for i in range(n):  # alternate which goes first, so drifts hit both alike
                for first in ((False, True) if i % 2 else (True, False)):
                    if first:
                        with dop(b, full_policy):
                            ours.append(timed_ms(fn, s.device))
                    else:
                        stock.append(timed_ms(fn, s.device))
                if seg.clock.expired():
                    break
        ms_s, ms_o = statistics.median(stock), statistics.median(ours)
        paired = statistics.median(o / t for o, t in zip(ours, stock))
        return {"stock_ms": ms_s, "dop_full_ms": ms_o, "overhead_pct": 100 * (ms_o / ms_s - 1),
                "paired_overhead_pct": 100 * (paired - 1), "pairs": len(stock), "partial": len(stock) < n}

    for phase, fn, n, warm in (("prefill", b.prefill(), s.overhead_pairs, s.warmup),
                               (f"prefill + decode {s.decode_tokens} tokens", b.generate(s.decode_tokens), s.decode_pairs,
                                min(s.warmup, 1))):  # a 64-token generate of a 7B model takes seconds: one warm-up pair
        r = seg.run(f"{attn} {phase}", lambda fn=fn, n=n, warm=warm: pairs(fn, n, warm))
        if r is None:
            continue
        seg.part.rows.append({"model": b.key, "attn": attn, "phase": phase, "stock_ms": _r(r["stock_ms"]),
                              "dop_full_ms": _r(r["dop_full_ms"]), "overhead_pct": _r(r["overhead_pct"], 2),
                              "paired_overhead_pct": _r(r["paired_overhead_pct"], 2), "pairs": r["pairs"],
                              "target_pct": OVERHEAD_TARGET_PCT,
                              "met": bool(r["paired_overhead_pct"] <= OVERHEAD_TARGET_PCT)})


def part_memory(seg: Segment, full_cache: dict) -> None:
    """Peak CUDA memory of a prefill and of a generate, the stock model vs DOP_CD at each paper policy."""
    b, s = seg.bench, seg.s
    attn = s.attn[0]
    set_attn(b.model, attn)
    weights = sum(p.numel() * p.element_size() for p in b.model.parameters())

    def peak(fn) -> tuple[float | None, float | None, float]:
        """Peak allocated GiB during `fn` (absolute, and above what was allocated before) and its ms."""
        if not s.cuda:
            with torch.no_grad():
                ms = timed_ms(fn, s.device)  # the same code path; CPU peak memory is not measured
            return None, None, ms
        sync(s.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            ms = timed_ms(fn, s.device)
        top = torch.cuda.max_memory_allocated()
        return top / 2**30, (top - base) / 2**30, ms

    def unit(policy, reducer):
        with dop(b, policy, reducer):
            with torch.no_grad():
                b.prefill()()  # warm-up: lazily allocated workspaces belong to neither measurement
            p_peak, p_above, _ = peak(b.prefill())
            d_peak, d_above, d_ms = peak(b.generate(s.decode_tokens))
        return {"prefill_peak_gib": p_peak, "prefill_above_gib": p_above, "decode_peak_gib": d_peak,
                "decode_above_gib": d_above, "sample_ms": d_ms}

    from vlmeval_dop.policy import DOPPolicy

    configs = [("stock (unpruned)", None, None)] + [(f"DOP_CD at {bud}", pol, "cdpruner") for bud, pol in b.policies.items()]
    for label, policy, reducer in configs:
        r = seg.run(f"{attn} {label}", lambda p=policy, red=reducer: unit(p, b.cdpruner() if red else None))
        if r is None:
            continue
        tf = b.tflops(policy or DOPPolicy.full(b.spec.num_layers))
        seg.part.rows.append({"model": b.key, "attn": attn, "method": label, "policy": str(policy) if policy else "full",
                              "tflops_ratio": _r(tf["ratio"], 4), "weights_gib": _r(weights / 2**30),
                              **{k: _r(v) for k, v in r.items()}, "decode_tokens": s.decode_tokens,
                              "measured": s.cuda, "note": None if s.cuda else "peak memory is measured on CUDA only"})


def part_search(seg: Segment, full_cache: dict) -> None:
    """Divergence-profiling time: ours on `search_samples` samples, the paper's procedure on a few."""
    import search_cost
    from vlmeval_dop.search.profile import ProfileCounter

    b, s = seg.bench, seg.s
    depths, visual = search_cost.sampling_points(b.key, b.spec.num_layers, b.spec.visual_tokens)
    kw = {"image_token_ids": b.image_token_ids, "vocab": b.vocab}
    target = s.search_samples
    reducer = b.cdpruner()
    # the paper's procedure gets a fifth of this segment at most, reserved up front; ours the rest
    naive_clock = Clock(seg.clock.deadline)
    ours_clock = Clock(time.perf_counter() + 0.8 * max(seg.clock.left(), 0))

    def ours() -> dict:
        set_attn(b.model, "sdpa")
        search_cost.profile_ours(b.model, b.inputs, depths, visual, 1, 1, reducer, None, None, first_seed=10**6, **kw)
        counter, done, seconds, batch, notes = ProfileCounter(), 0, 0.0, s.search_batch.get(b.key, 4), []
        while done < target and not ours_clock.expired():
            n = min(batch, target - done)
            try:
                r = search_cost.profile_ours(b.model, b.inputs, depths, visual, n, n, reducer, counter, None,
                                             first_seed=done, **kw)
            except OOM_ERRORS:
                free_cuda()
                if batch == 1:
                    raise
                notes.append(f"CUDA out of memory at batch {batch}: halved")
                batch //= 2
                continue
            done += r["samples"]
            seconds += r["seconds"]
        return {"samples": done, "seconds": seconds, "batch": batch, "counter": counter, "notes": notes,
                "partial": done < target}

    def paper() -> dict:
        set_attn(b.model, "eager")
        try:
            counter = ProfileCounter()
            r = search_cost.profile_paper(b.model, b.inputs, depths, visual, s.naive_samples, reducer, counter,
                                          naive_clock.deadline, **kw)
        finally:
            set_attn(b.model, "sdpa")
        return {**r, "batch": 1, "notes": [], "partial": r["samples"] < s.naive_samples}

    base = {"model": b.key, "reducer": "cdpruner", "depths": depths, "n_v": visual, "target_samples": target,
            "goal_s": SEARCH_GOAL_S if target == 100 else None,
            "paper_a100_min": PAPER_SEARCH_MIN.get(b.key) if not (s.smoke or s.shrink > 1) else None}
    for name, fn, clock in (("ours (prefix sharing, vision once, batched, sdpa)", ours, ours_clock),
                            ("paper (3I+1 full runs, batch 1, eager)", paper, naive_clock)):
        seg.clock, seg.smallest_unit = clock, None  # two different procedures: no size estimate across them
        r = seg.run(name, fn)
        if r is None or r["samples"] == 0:
            if r is not None:
                seg.part.skipped.append({"what": f"{b.key}: {name}", "reason": "no sample fit in the cap"})
            continue
        per = r["seconds"] / r["samples"]
        seg.part.rows.append({**base, "procedure": name, "batch": r["batch"], "samples": r["samples"],
                              "seconds": _r(r["seconds"], 2), "seconds_per_sample": _r(per, 4),
                              "seconds_for_target": _r(per * target, 1), "projected": r["samples"] < target,
                              "layer_equivalents_per_sample": _r(r["counter"].layer_equivalents / r["samples"], 1),
                              "met_goal": (per * target <= SEARCH_GOAL_S) if base["goal_s"] and name.startswith("ours") else None,
                              "notes": r["notes"]})


def part_reducers(seg: Segment, full_cache: dict) -> None:
    """Each reducer's selection (benchmarks/reducer_cost.py, random inputs of the model's real sizes) against
    the pruned prefill it enables on this model (n_keep tokens in every layer, uniform reducer)."""
    import reducer_cost
    from vlmeval_dop.policy import DOPPolicy

    b, s = seg.bench, seg.s
    name, crops, n_keep, newlines = reducer_cost.SETTINGS[0 if b.spec.family == "llava" else 1]
    sizes: dict[str, int] = {}
    if s.smoke:  # the tiny model's sizes, widths of the tiny towers
        patches = b.spec.visual_tokens // crops
        n_keep = max(crops, round(n_keep * patches / 576))
        newlines = b.spec.visual_extra_tokens
        sizes = {"patches": patches, "width": b.spec.hidden_size, "clip_width": 32, "emb_width": 32}
        name = f"{name.split()[0]} tiny {crops * patches}->{n_keep}"
    torch.manual_seed(0)
    cases = reducer_cost.reducer_cases(crops, n_keep, newlines, s.device, s.torch_dtype, **sizes)
    clip = reducer_cost.clip_text_case(s.device, s.torch_dtype, 32 if s.smoke else 1)
    L = b.spec.num_layers
    pruned = DOPPolicy(L, L, min(n_keep, b.spec.visual_tokens))

    def prefill():
        with dop(b, pruned, "uniform"):
            return repeat_ms(b.prefill(), s, seg.clock)

    set_attn(b.model, s.attn[0])
    ref = seg.run(f"{s.attn[0]} pruned prefill {pruned}", prefill)
    for label, fn in cases:
        r = seg.run(f"{name}: {label}", lambda fn=fn: repeat_ms(fn or clip, s, seg.clock))
        if r is None:
            continue
        seg.part.rows.append({"model": b.key, "setting": name, "reducer": label, "reducer_ms": _r(r["ms"]),
                              "prefill_policy": str(pruned), "prefill_ms": _r(ref and ref["ms"]),
                              "ratio": _r(r["ms"] / ref["ms"], 5) if ref else None, "reps": r["reps"]})


def part_throughput(seg: Segment, full_cache: dict) -> None:
    """Evaluation throughput (`run.py --batch-size N` vs VLMEvalKit's one-sample loop, issue #16) of a pruned
    LLaVA-1.5-7B entry (the lowest paper budget's policy, uniform reducer) on generated DOP_Demo-style samples.

    benchmarks/eval_throughput.py builds the model: random weights at the real widths and depth on CUDA (the
    bench's own model has no processor); the tiny model in smoke/CPU runs. Each batch size runs from an empty
    work folder; `same_predictions` compares its answers with the one-sample loop's."""
    import eval_throughput
    from vlmeval_dop.policy import DOPPolicy

    b, s = seg.bench, seg.s
    if b.key not in PART_MODELS["throughput"]:
        seg.part.skipped.append({"what": f"{b.key}: all", "reason": "measured on the LLaVA-1.5-7B shape only"})
        return
    os.environ.setdefault("LMUData", tempfile.mkdtemp(prefix="gpu_suite_lmu_"))  # VLMEvalKit's image folder
    if s.cuda and s.shrink == 1:
        built = seg.run("build 7B-shaped model", lambda: eval_throughput.build_model(32, 24, s.device, s.torch_dtype))
        if built is None:
            return
        model, processor = built
        policy, n, new = min(b.policies.items())[1], 48, 16
    else:  # smoke and CPU checks: the tiny model through the same loop
        from vlmeval_dop.tiny import load_tiny

        model, processor = load_tiny("llava15", dtype=s.torch_dtype)
        L = model.config.text_config.num_hidden_layers
        policy, n, new = DOPPolicy(L - 1, L - 2, 16), 8, 4
    wrapper = eval_throughput.make_wrapper(model, processor, policy, new, s.device, s.dtype)
    data = eval_throughput.make_dataset(n)
    base = None
    for bs in THROUGHPUT_BATCHES:
        work = tempfile.mkdtemp(prefix=f"gpu_suite_thr{bs}_")
        r = seg.run(f"batch {bs}", lambda bs=bs, work=work: eval_throughput.run_loop(wrapper, data, bs, work))
        if r is None:
            continue
        seconds, preds = r
        if bs == 1:
            base = (seconds, preds)
        seg.part.rows.append({
            "model": b.key, "policy": str(policy), "samples": n, "max_new_tokens": new, "batch_size": bs,
            "seconds": _r(seconds), "samples_per_s": _r(n / seconds),
            "speedup_vs_loop": _r(base[0] / seconds) if base else None,
            "same_predictions": (preds == base[1]) if base else None,
        })
    del wrapper, model
    free_cuda()


PART_FUNCS: dict[str, Callable[[Segment, dict], None]] = {
    "latency": part_latency, "cdpruner": part_cdpruner, "overhead": part_overhead, "memory": part_memory,
    "reducers": part_reducers, "search": part_search, "throughput": part_throughput,
}


# ---------------------------------------------------------------------------------------------- output
def gpu_name(s: Settings) -> str:
    return torch.cuda.get_device_name(0) if s.cuda else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _fmt(x, nd: int = 1, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.{nd}f} %" if pct else f"{x:.{nd}f}"


def markdown(report: dict) -> str:
    """The tables of one run (what docs/benchmarks.md links to)."""
    env, parts = report["environment"], report["parts"]
    out = [f"# GPU suite: {report['date']}, {env['gpu']}", "",
           f"`{report['command']}` — {report['source']}, {env['device']} {env['dtype']}; torch {env['torch']}, "
           f"transformers {env['transformers']}; {report['total_seconds']:.0f} s of the {report['total_cap_s']:.0f} s "
           f"cap (imports and model builds included). Warm-up {report['settings']['warmup']}, median of "
           f"{report['settings']['reps']} (CUDA events)." if env["device"].startswith("cuda") else
           f"`{report['command']}` — {report['source']}, {env['device']} {env['dtype']}; torch {env['torch']}, "
           f"transformers {env['transformers']}; {report['total_seconds']:.0f} s of the {report['total_cap_s']:.0f} s "
           "cap. CPU run: a check that the suite runs, not a measurement to quote.", ""]
    status = ", ".join(f"{k} {v['status']}" for k, v in parts.items())
    out += [f"Parts: {status}.", ""]
    for name, p in parts.items():
        if p["reason"]:
            out.append(f"- {name}: {p['reason']}")
    if any(p["reason"] for p in parts.values()):
        out.append("")
    def paper_ms(r):
        return ", ".join(f"{k} {v}" for k, v in (r["paper_ms"] or {}).items()) or "-"

    def search_target(r):
        return f"{r['target_samples']}: {r['seconds_for_target']:.1f}" + (" (projected)" if r["projected"] else "")

    pct = functools.partial(_fmt, pct=True)
    tables = {  # part -> (title, preamble, [(column, cell(row))])
        "latency": ("Prefill latency vs executed TFLOPs (DOP, uniform reducer, vs stock)", None, [
            ("model", lambda r: r["model"]), ("attn", lambda r: r["attn"]), ("budget", lambda r: pct(r["budget"], 0)),
            ("policy", lambda r: r["policy"]), ("TFLOPs (Eq. 11)", lambda r: pct(r["tflops_ratio"])),
            ("executed", lambda r: pct(r["executed_ratio"])), ("prefill ms", lambda r: _fmt(r["prefill_ms"])),
            ("stock ms", lambda r: _fmt(r["full_ms"])), ("latency / stock", lambda r: _fmt(r["latency_ratio"], 3)),
            ("(latency / stock) / executed", lambda r: _fmt(r["latency_over_executed"], 2))]),
        "cdpruner": ("DOP_CD vs CDPruner at equal TFLOPs (prefill)", None, [
            ("model", lambda r: r["model"]), ("attn", lambda r: r["attn"]), ("budget", lambda r: pct(r["budget"], 0)),
            ("CDPruner", lambda r: r["cdpruner_policy"]), ("TFLOPs", lambda r: pct(r["cdpruner_tflops_ratio"])),
            ("ms", lambda r: _fmt(r["cdpruner_ms"])), ("DOP_CD", lambda r: r["dop_cd_policy"]),
            ("TFLOPs", lambda r: pct(r["dop_cd_tflops_ratio"])), ("ms", lambda r: _fmt(r["dop_cd_ms"])),
            ("DOP_CD / CDPruner", lambda r: _fmt(r["dop_cd_over_cdpruner"], 3)),
            ("DOP_CD / stock", lambda r: _fmt(r["dop_cd_over_full"], 3)), ("paper, A100 (ms)", paper_ms)]),
        "overhead": ("Full-policy overhead vs stock transformers", None, [
            ("model", lambda r: r["model"]), ("attn", lambda r: r["attn"]), ("phase", lambda r: r["phase"]),
            ("stock ms", lambda r: _fmt(r["stock_ms"])), ("DOP full ms", lambda r: _fmt(r["dop_full_ms"])),
            ("overhead (medians)", lambda r: f"{r['overhead_pct']:+.2f} %"),
            ("overhead (paired)", lambda r: f"{r['paired_overhead_pct']:+.2f} %"), ("pairs", lambda r: str(r["pairs"])),
            ("<= 2 %", lambda r: "yes" if r["met"] else "no")]),
        "memory": ("Peak memory (GiB): prefill and generate, DOP_CD vs stock",
                   "Peak allocated during the call; 'above start' = over what was allocated when it began (weights, "
                   "inputs, the CLIP text tower), i.e. activations and KV cache.", [
            ("model", lambda r: r["model"]), ("method", lambda r: r["method"]), ("policy", lambda r: r["policy"]),
            ("TFLOPs", lambda r: pct(r["tflops_ratio"])), ("weights", lambda r: _fmt(r["weights_gib"], 2)),
            ("prefill peak", lambda r: _fmt(r["prefill_peak_gib"], 2)),
            ("prefill above start", lambda r: _fmt(r["prefill_above_gib"], 2)),
            ("generate peak", lambda r: _fmt(r["decode_peak_gib"], 2)),
            ("generate above start", lambda r: _fmt(r["decode_above_gib"], 2)),
            ("tokens", lambda r: str(r["decode_tokens"])), ("generate ms (1 run)", lambda r: _fmt(r["sample_ms"]))]),
        "reducers": ("Reducer cost vs the pruned prefill", None, [
            ("model", lambda r: r["model"]), ("setting", lambda r: r["setting"]), ("reducer", lambda r: r["reducer"]),
            ("reducer ms", lambda r: _fmt(r["reducer_ms"], 2)), ("pruned prefill", lambda r: r["prefill_policy"]),
            ("prefill ms", lambda r: _fmt(r["prefill_ms"])), ("ratio", lambda r: pct(r["ratio"], 2))]),
        "search": ("Search profiling cost (D_A, D_P, D_v curves; CDPruner for D_v)", None, [
            ("model", lambda r: r["model"]), ("procedure", lambda r: r["procedure"]), ("batch", lambda r: str(r["batch"])),
            ("samples run", lambda r: str(r["samples"])), ("seconds", lambda r: f"{r['seconds']:.1f}"),
            ("s / sample", lambda r: f"{r['seconds_per_sample']:.3f}"), ("target samples: s", search_target),
            ("layer-eq / sample", lambda r: str(r["layer_equivalents_per_sample"])),
            ("paper, A100 (min, 100 samples)", lambda r: "-" if r["paper_a100_min"] is None else str(r["paper_a100_min"]))]),
        "throughput": ("Evaluation throughput: run.py --batch-size N vs VLMEvalKit's one-sample loop (N = 1)", None, [
            ("model", lambda r: r["model"]), ("policy", lambda r: r["policy"]), ("samples", lambda r: str(r["samples"])),
            ("new tokens", lambda r: str(r["max_new_tokens"])), ("batch", lambda r: str(r["batch_size"])),
            ("seconds", lambda r: _fmt(r["seconds"], 2)), ("samples/s", lambda r: _fmt(r["samples_per_s"], 2)),
            ("x loop", lambda r: _fmt(r["speedup_vs_loop"], 2)),
            ("same answers", lambda r: "-" if r["same_predictions"] is None else ("yes" if r["same_predictions"] else "no"))]),
    }
    for name, (title, preamble, columns) in tables.items():
        if name not in parts:
            continue
        out += [f"## {title}", ""] + ([preamble, ""] if preamble else [])
        out += ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in parts[name]["rows"]]
        if name == "memory" and any(not r["measured"] for r in parts[name]["rows"]):
            out.append("\n(CPU run: peak memory is measured on CUDA only; the rows show the code path ran.)")
        out.append("")
    return "\n".join(out)


def environment(s: Settings) -> dict:
    import transformers

    env = {"device": s.device, "dtype": s.dtype, "gpu": gpu_name(s), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if s.cuda:
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def output_stem(s: Settings, date: str) -> str:
    stem = f"{date}-{slug(gpu_name(s))}"
    if s.smoke:
        stem += "-smoke"
    if s.shrink > 1:
        stem += f"-shrink{s.shrink}"
    return stem


def write(report: dict, json_path: Path, md_path: Path) -> None:
    for path, text in ((json_path, json.dumps(report, indent=1) + "\n"), (md_path, markdown(report) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # a run killed mid-write leaves the previous complete file


# ---------------------------------------------------------------------------------------------- main
def _models_left(part: str, left: tuple[str, ...]) -> int:
    """How many of the models still to run this part measures (its cap left is shared among them)."""
    return max(1, sum(1 for m in left if m in PART_MODELS.get(part, left)))


def run_suite(s: Settings, out: Path, argv: list[str], t0: float | None = None) -> dict:
    """Run the selected parts model by model (one model built at a time), within the caps; write as it goes.
    `t0` is where the total cap counts from (default: this process's start)."""
    t0 = _T0 if t0 is None else t0
    total_deadline = t0 + s.total_cap
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(s, date)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    parts = {name: PartResult(name, s.caps[name]) for name in s.parts}
    source = ("tiny checkpoints (vlmeval_dop.tiny)" if s.smoke else "random weights at the real shapes"
              + (f", widths / {s.shrink}, 4 layers" if s.shrink > 1 else ""))
    report: dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.py", "version": 1, "date": date,
        "command": "python benchmarks/gpu_suite.py" + ("" if not argv else " " + " ".join(argv)),
        "source": source, "environment": environment(s),
        "settings": {k: v for k, v in vars(s).items()}, "total_cap_s": s.total_cap, "builds": [],
        "parts": {}, "total_seconds": 0.0, "skipped": [],
    }

    def flush() -> None:
        report["parts"] = {n: p.to_json() for n, p in parts.items()}
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        report["skipped"] = [f"{n}: {p.reason()}" for n, p in parts.items() if p.reason()]
        write(report, json_path, md_path)

    full_cache: dict = {}
    for i, key in enumerate(s.models):
        # each part's cap left is shared by the models it has still to run
        budgets = {n: (p.cap_s - p.used_s) / _models_left(n, s.models[i:]) for n, p in parts.items()}
        if not any(v > 0 for v in budgets.values()) or time.perf_counter() >= total_deadline:
            for n, p in parts.items():
                why = "total cap reached" if time.perf_counter() >= total_deadline else f"{n} cap used up"
                p.skipped.append({"what": f"{key}: all", "reason": why})
            continue
        print(f"[gpu_suite] {key}: building ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
        try:
            bench = build_bench(key, s)
        except OOM_ERRORS as exc:
            free_cuda()
            for p in parts.values():
                p.skipped.append({"what": f"{key}: all", "reason": f"model build: CUDA out of memory: {str(exc).splitlines()[0]}"})
            flush()
            continue
        except Exception as exc:
            traceback.print_exc()
            for p in parts.values():
                p.errors.append({"what": f"{key}: all", "error": f"model build: {type(exc).__name__}: {exc}"})
            flush()
            continue
        report["builds"].append({"model": key, "seconds": round(bench.build_s, 1), "source": bench.source,
                                 "layers": bench.spec.num_layers, "hidden_size": bench.spec.hidden_size,
                                 "visual_tokens": bench.spec.visual_tokens, "placeholders": bench.placeholders,
                                 "text_tokens": bench.text_tokens,
                                 "policies": {str(k): str(v) for k, v in bench.policies.items()}})
        for name, p in parts.items():
            start = time.perf_counter()
            budget = (p.cap_s - p.used_s) / _models_left(name, s.models[i:])
            deadline = min(start + budget, total_deadline)
            print(f"[gpu_suite] {key}: {name} ({max(deadline - start, 0):.0f} s budget)", flush=True)
            seg = Segment(p, bench, Clock(deadline), s)
            if deadline <= start:
                why = "total cap reached" if total_deadline <= start else f"{name} cap used up"
                p.skipped.append({"what": f"{key}: all", "reason": why})
            else:
                try:
                    PART_FUNCS[name](seg, full_cache)
                except Exception as exc:  # a part's own bookkeeping failing: recorded, the suite goes on
                    traceback.print_exc()
                    p.errors.append({"what": f"{key}: {name}", "error": f"{type(exc).__name__}: {exc}"})
                with contextlib.suppress(Exception):
                    set_attn(bench.model, "sdpa")
            took = time.perf_counter() - start
            p.used_s += took
            p.segments.append({"model": key, "seconds": round(took, 2), "budget_s": round(max(budget, 0), 1)})
            flush()
        del bench
        full_cache.clear()
        free_cuda()
    flush()
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line entry. Run as a script the total cap counts from process start; called with `argv` (tests)
    it counts from this call."""
    t0 = _T0 if argv is None else time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    s, out = parse_args(argv)
    try:
        import vlmeval_dop  # noqa: F401  (checks the transformers release at import)
    except ImportError as exc:
        print(f"gpu_suite.py: {exc}\nOn a machine with another transformers, carry the tested release as a wheel "
              "(docs/benchmarks.md, 'One bounded GPU suite').", file=sys.stderr)
        return 2
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_")) if s.smoke else HERE / "results"
    if s.device == "cpu" and not s.smoke:
        print("[gpu_suite] CPU run of the GPU code path: a check, not numbers to quote", flush=True)
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        report = run_suite(s, out, argv, t0)
    finally:
        torch.set_num_threads(threads)  # the caller's setting back (tests run in-process)
    stem = output_stem(s, report["date"])
    print(markdown(report))
    print(f"[gpu_suite] {report['total_seconds']:.0f} s of the {s.total_cap:.0f} s cap; wrote {out / stem}.json and .md")
    if report["skipped"]:
        print("[gpu_suite] SKIPPED / PARTIAL / ERRORS:")
        for line in report["skipped"]:
            print(f"  - {line}")
    else:
        print("[gpu_suite] nothing skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
