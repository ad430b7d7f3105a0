"""Your own comparison: methods x budgets x benchmarks x seeds from a YAML spec, planned, run and aggregated
like the paper's tables.

    python reproduce/run.py --compare mine.yaml [--dry-run] [--work-dir outputs] [--limit K] [--gpus N]
    python reproduce/aggregate.py --compare mine.yaml [--work-dir outputs] [--out DIR] [--mme auto]

The spec (a YAML mapping; reproduce/compare_example.yaml runs offline on the tiny demo):

    name: mine                    # names the output files (default: the spec file's name)
    plugins: [mymodule]           # optional: modules registering methods (next to the spec, installed, or .py)
    models: [llava15_7b]          # model names of `vlmeval-dop list`
    methods: [full, dop, vispruner, mymethod]   # method names, or explicit entry names (llava15_7b_dopcd28)
    budgets: [0.28, 0.19, 0.11]   # TFLOPs as fractions of the full model; a method runs as {model}_{method}{28}
    benchmarks: [TextVQA, GQA]    # the paper's aliases or VLMEvalKit dataset names (DOP_Demo offline)
    seeds: [0, 1, 2]              # only for methods that declare a seed ({entry}.s{seed}); others run once

Everything is checked before anything runs or is written: an unknown key, model, method, benchmark or a
budget that is not a fraction in (0, 1) is one error naming the valid values. Each model's unpruned row
(`full`) is always part of the comparison: it is the Rel. Avg. denominator. A cell that cannot run (a budget
the method cannot meet, a component that is not registered, a DOP budget without a policy) is planned as
blocked with the registry's reason, never dropped.

The table (`compare_table`): one row per (model, method, budget) with the entry's analytic TFLOPs (paper count,
`vlmeval-dop list`'s number), one column per benchmark and Rel. Avg. against the same model's full row
(reproduce/relavg.py), each the mean +- sample standard deviation (n - 1) over the seeds that have the value
(n shown). A Rel. Avg. is computed per seed run that has every benchmark, then averaged. A base (full
model) score that is 0 or missing makes that row's Rel. Avg. "undefined" with the reason; a missing cell says
why (blocked, failed in VLMEvalKit, not run yet). Plots: score (and Rel. Avg.) against TFLOPs, one line per
method, PNG and SVG.

No vlmeval import unless a benchmark is neither an alias nor a dataset of entries.yaml (then VLMEvalKit's
dataset list is consulted, as run.py does); the entry registry (vlmeval_dop.registry) is read for entries,
reasons and TFLOPs.
"""
from __future__ import annotations

import difflib
import io
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

SPEC_KEYS = {
    "name": "names the output files (default: the spec file's stem)",
    "plugins": "modules that register methods of your own (imported before anything is resolved)",
    "models": "model names (`vlmeval-dop list`)",
    "methods": "method names or explicit entry names; `full` is the unpruned model",
    "budgets": "TFLOPs fractions of the full model, e.g. [0.28, 0.19]",
    "benchmarks": "paper aliases (TextVQA, GQA, ...) or VLMEvalKit dataset names (DOP_Demo)",
    "seeds": "seeds for methods that declare one (entries {entry}.s{seed})",
}
FULL = "full"
REL_AVG = "Rel. Avg."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BASE_NOTE = "Rel. Avg. denominator"


class SpecError(ValueError):
    """A comparison spec that cannot be used as given: one message naming the valid values."""


# ----------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class CompareSpec:
    """A parsed comparison spec (types checked; names resolved by `resolve_rows`)."""

    name: str
    path: Path
    models: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[float, ...] = ()
    benchmarks: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    plugins: tuple[str, ...] = ()


def _str_list(raw: dict, key: str, required: bool) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        if required:
            raise SpecError(f"`{key}:` is required ({SPEC_KEYS[key]})")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"`{key}:` must be a list of names ({SPEC_KEYS[key]}), got {value!r}")
    if required and not value:
        raise SpecError(f"`{key}:` is empty ({SPEC_KEYS[key]})")
    return tuple(dict.fromkeys(v.strip() for v in value))


def parse_spec(raw, path: str | Path) -> CompareSpec:
    """Check the shape and types of a spec mapping (`load_spec` reads it from YAML). SpecError otherwise."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a comparison spec is a YAML mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(map(str, raw)) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{path}: name {name!r} must be letters, digits, '_', '-', '.' (it names output files)")
    budgets = raw.get("budgets") or []
    if not isinstance(budgets, list) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in budgets):
        raise SpecError(f"{path}: budgets {budgets!r}: give TFLOPs fractions of the full model in (0, 1), "
                        "e.g. [0.28, 0.19, 0.11] (0.28 = 28 %)")
    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in seeds):
        raise SpecError(f"{path}: seeds {seeds!r}: give a list of whole numbers >= 0, e.g. [0, 1, 2]")
    try:
        return CompareSpec(
            name=name, path=path, models=_str_list(raw, "models", True), methods=_str_list(raw, "methods", True),
            budgets=tuple(dict.fromkeys(float(b) for b in budgets)),
            benchmarks=_str_list(raw, "benchmarks", True), seeds=tuple(dict.fromkeys(seeds)),
            plugins=_str_list(raw, "plugins", False),
        )
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def load_spec(path: str | Path) -> CompareSpec:
    """Read and type-check a comparison spec file (SpecError: missing file, bad YAML, bad keys or values)."""
    from vlmeval_dop.fileio import read_yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"comparison spec {str(path)!r} not found (a YAML file; see reproduce/compare_example.yaml)")
    return parse_spec(read_yaml(path, "fix the spec (see reproduce/compare_example.yaml)"), path)


def plugin_targets(spec: CompareSpec) -> list[str]:
    """The spec's plugins as the registry's `load_plugins` and run.py's `--plugins` take them: a `.py` path
    relative to the spec's folder, and a module name that is a file of that folder, become absolute paths
    (so every run.py process finds them); other module names pass unchanged (installed or on PYTHONPATH)."""
    folder = spec.path.resolve().parent
    out = []
    for plugin in spec.plugins:
        if plugin.endswith(".py") or "/" in plugin:
            path = Path(plugin).expanduser()
            out.append(str(path if path.is_absolute() else (folder / path).resolve()))
        elif (folder / f"{plugin}.py").is_file():
            out.append(str(folder / f"{plugin}.py"))
        else:
            out.append(plugin)
    return out


def load_plugins(spec: CompareSpec) -> None:
    """Import the spec's plugin modules (their methods register on import) with the registry's
    `vlmeval_dop.plugins.load_plugins`. A module next to the spec file needs no installation."""
    if not spec.plugins:
        return
    from vlmeval_dop.plugins import PluginError, load_plugins as registry_load

    try:
        registry_load(plugin_targets(spec))
    except PluginError as exc:  # names the module and the cause
        raise SpecError(f"{spec.path}: plugins: {exc}") from None
    from vlmeval_dop import registry

    registry.load_entries.cache_clear()  # entries of the new methods exist from now on


# ----------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Run:
    """One evaluated entry of a row: the seed it was run with (None: the method takes none) and what blocks
    it ("" if it can run)."""

    entry: str
    seed: int | None = None
    blocked: str = ""


@dataclass(frozen=True)
class Row:
    """One table row: a model, a method at one budget (None: unlabelled), its runs over the seeds.

    `label` is the entry name without a seed suffix; `base` marks the model's unpruned row."""

    model: str
    method: str
    budget: float | None
    label: str
    runs: tuple[Run, ...]
    base: bool = False
    note: str = ""


def _registered_methods() -> dict[str, str]:
    """Method names -> what they are: full, the DOP variants, every registered method (the package's and
    the plugins'), baselines.yaml's recipes (resize), and the method labels of explicit entries."""
    from vlmeval_dop import registry
    from vlmeval_dop.methods import registered
    from vlmeval_dop.models_config import CONFIG_DIR

    out = {FULL: "the unpruned model", "dop": "DOP, the paper's headline variant of the model's family"}
    out.update({m: "DOP variant" for m in registry.read_entries_config(CONFIG_DIR).methods})
    out.update({m: f"{info.kind}-side method" for m, info in registered().items() if m not in out})
    out.update({m: "baseline" for m in registry.read_baselines_config(CONFIG_DIR).recipes if m not in out})
    for e in registry.load_entries().values():
        out.setdefault(e.method, "entry label")
    return out


def _declares_seed(method: str) -> bool:
    """Whether `method` takes a seed (its entries accept `.s{seed}`: `entry_args={"seed": int}`)."""
    from vlmeval_dop.methods import method_info

    try:
        return method_info(method).takes_seed
    except KeyError:  # full, the DOP variants, entry labels: no seed
        return False


def _blocked(entry: str) -> str:
    """Why `entry` cannot run ("" if it can): the registry's own message (unknown or infeasible entry,
    unregistered component, missing fitted file)."""
    from vlmeval_dop.registry import EntryError, get_entry

    try:
        return get_entry(entry).unavailable_reason() or ""
    except EntryError as exc:
        return str(exc)


def _close(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def resolve_benchmarks(spec: CompareSpec) -> dict[str, str]:
    """Benchmark as written -> VLMEvalKit dataset name; SpecError naming the valid names otherwise."""
    from reproduce.run import benchmark_datasets

    aliases = benchmark_datasets()
    out, unknown = {}, []
    for b in spec.benchmarks:
        if b in aliases:
            out[b] = aliases[b]
        elif b in aliases.values():
            out[b] = b
        else:
            unknown.append(b)
    if unknown:  # VLMEvalKit's own datasets, our plugins (DOP_Demo) and custom TSVs: ask as run.py does
        from vlmeval_dop.datasets import UnknownDatasetError, resolve_dataset_name

        for b in unknown:
            try:
                out[b] = resolve_dataset_name(b)
            except UnknownDatasetError as exc:
                raise SpecError(f"{spec.path}: benchmarks: {exc}") from None
    return {b: out[b] for b in spec.benchmarks}


def resolve_rows(spec: CompareSpec) -> list[Row]:
    """The table's rows: for every model its full row, then every method at every budget (an explicit entry
    name once), each with one run per seed where the method declares a seed. SpecError (one message naming
    the valid values) for unknown models and methods or a method without budgets."""
    from vlmeval_dop.models_config import CONFIG_DIR
    from vlmeval_dop.registry import EntryError, budget_label, get_entry, read_entries_config

    models = list(read_entries_config(CONFIG_DIR).models)
    bad = [m for m in spec.models if m not in models]
    if bad:
        raise SpecError(f"{spec.path}: unknown model(s) {', '.join(f'{m!r}{_close(m, models)}' for m in bad)}; "
                        f"valid models: {', '.join(models)}")
    known = _registered_methods()
    explicit: dict[str, object] = {}
    problems = []
    for m in spec.methods:
        if m in known:
            continue
        try:
            e = get_entry(m)
        except EntryError as exc:  # an entry-shaped name keeps the registry's reason (`write it ...`, infeasible)
            why = "" if str(exc).startswith("unknown entry") else f" ({exc})"
            problems.append(f"{m!r}{why or _close(m, known)}")
            continue
        if e.model.name not in spec.models:
            raise SpecError(f"{spec.path}: entry {m!r} runs model {e.model.name!r}, which is not in models: "
                            f"{', '.join(spec.models)}")
        explicit[m] = e
    if problems:
        raise SpecError(f"{spec.path}: unknown method(s) {', '.join(problems)}; valid methods: "
                        f"{', '.join(known)} (or an entry name of `vlmeval-dop list`)")
    need = [m for m in spec.methods if m in known and m != FULL]
    if need and not spec.budgets:
        raise SpecError(f"{spec.path}: method(s) {', '.join(need)} need `budgets:` (TFLOPs fractions, e.g. "
                        "[0.28, 0.19]); explicit entry names need none")

    cfg = read_entries_config(CONFIG_DIR)

    def runs(name: str, method: str) -> tuple[Run, ...]:
        if spec.seeds and _declares_seed(method):
            return tuple(Run(f"{name}.s{s}", s, _blocked(f"{name}.s{s}")) for s in spec.seeds)
        return (Run(name, None, _blocked(name)),)

    def dop_runs(model: str, method: str, budget: float) -> tuple[Run, ...]:
        """A DOP variant's entry exists where a policy does (the paper's, or one installed by a search)."""
        name = f"{model}_{method}{budget_label(budget)}"
        (run,) = runs(name, method)
        if not run.blocked.startswith("unknown entry"):
            return (run,)
        variant = (cfg.paper.get(model) or {}).get("dop") if method == "dop" else method
        reducer = (cfg.methods.get(variant) or {}).get("reducer", "<reducer>")
        return (Run(name, None, f"no {method} policy for {model} at {100 * budget:g} % TFLOPs: search one with "
                                f"`vlmeval-dop search --model {model} --reducer {reducer} --data TextVQA_TRAIN "
                                f"--budget {budget:g} --install <tag>` and list its entry "
                                f"{model}_{variant or method}{budget_label(budget)}_<tag> in `methods:`"),)

    rows: dict[str, Row] = {}
    for model in spec.models:
        note = "" if FULL in spec.methods else BASE_NOTE
        rows[model] = Row(model, FULL, None, model, runs(model, FULL), base=True, note=note)
        for m in spec.methods:
            if m == FULL:
                continue
            if m in explicit:
                e = explicit[m]
                if e.model.name == model and m not in rows:  # a seeded entry (`x.s3`) runs its own seed only
                    rows[m] = Row(model, e.method, e.budget, m,
                                  runs(m, e.method) if e.seed is None else (Run(m, e.seed, _blocked(m)),))
                continue
            for b in spec.budgets:
                name = f"{model}_{m}{budget_label(b)}"
                if name not in rows:
                    dop = m == "dop" or m in cfg.methods
                    rows[name] = Row(model, m, b, name, dop_runs(model, m, b) if dop else runs(name, m))
    return list(rows.values())


def plan_compare(spec: CompareSpec, work_dir: Path):
    """Every (run, benchmark) cell of the comparison with its status, as reproduce/run.py's `Cell`s (row =
    the row's label, entry = the run's entry): done / todo by VLMEvalKit's score file, or blocked with the
    reason. Nothing is written."""
    from reproduce.run import _cell

    datasets = resolve_benchmarks(spec)
    cells = []
    for row in resolve_rows(spec):
        for run in row.runs:
            cells += [_cell(row.label, run.entry, b, d, run.blocked, work_dir, row.note) for b, d in datasets.items()]
    return cells


def prepare(path: str | Path) -> CompareSpec:
    """load_spec + load_plugins + the name checks of resolve_rows / resolve_benchmarks: everything that can
    be wrong with a spec is found here, before anything runs."""
    spec = load_spec(path)
    load_plugins(spec)
    resolve_rows(spec)
    resolve_benchmarks(spec)
    return spec


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Stat:
    """One table cell: the mean +- sample std over `n` values, or why there is none.

    status: `ok`, `missing` (no value: blocked, failed, not run) or `undefined` (Rel. Avg. without a usable
    base). `reason` says why for the last two, and which seeds lack a value when some do."""

    mean: float | None
    std: float | None = None
    n: int = 0
    status: str = "ok"
    reason: str = ""

    @staticmethod
    def of(values: list[float], of_n: int, lacking: str = "") -> "Stat":
        if not values:
            return Stat(None, None, 0, "missing", lacking)
        std = statistics.stdev(values) if len(values) > 1 else None  # sample std (n - 1)
        return Stat(statistics.fmean(values), std, len(values), "ok", lacking if len(values) < of_n else "")


@dataclass
class TableRow:
    """One row of the table: its TFLOPs (None with the reason when the entry cannot exist), its cells by
    benchmark and its Rel. Avg."""

    row: Row
    tflops: float | None
    ratio: float | None
    tflops_reason: str
    cells: dict[str, Stat]
    rel: Stat


@dataclass
class CompareTable:
    """The comparison's table: rows in spec order, benchmark columns as written in the spec, the per-run
    cells read (`runs`: one dict per run, as the long CSV writes them)."""

    spec: CompareSpec
    benchmarks: tuple[str, ...]
    rows: list[TableRow]
    runs: list[dict] = field(default_factory=list)


def _tflops(entry_name: str) -> tuple[float | None, float | None, str]:
    """(TFLOPs, fraction of the full model, reason if unknown) of an entry, from the analytic count."""
    from vlmeval_dop import registry

    try:
        entry = registry.get_entry(entry_name)
    except registry.EntryError as exc:  # worded as the row's blocked cells are: one footnote for both
        return None, None, f"blocked: {exc}"
    count = getattr(registry, "entry_tflops", None)
    r = count(entry) if count is not None else entry.tflops()
    if r is None:
        return None, None, f"{entry_name}: no analytic FLOPs count (the method gives no per-layer token counts)"
    return float(r["tflops"]), float(r["ratio"]), ""


def _failure(work_dir: Path, entry: str, dataset: str) -> str:
    """VLMEvalKit's recorded error for (entry, dataset) in `<entry>/status.json`, else ""."""
    try:
        rec = ((json.loads((Path(work_dir) / entry / "status.json").read_text()).get("datasets") or {})
               .get(dataset) or {})
    except (OSError, ValueError, AttributeError):
        return ""
    msg = rec.get("error_message") or rec.get("skip_reason") or ""
    return str(msg).splitlines()[0] if msg else ""


def compare_table(spec: CompareSpec, work_dir: str | Path, mme: str = "auto") -> CompareTable:
    """Read every run's VLMEvalKit score files and build the table (nothing is written, nothing raises for
    missing or zero scores: those cells say why)."""
    from reproduce.aggregate import InputError, _mme_unit, find_score_file, read_score_file
    from vlmeval_dop.entry_record import record_mismatch

    work_dir = Path(work_dir)
    datasets = resolve_benchmarks(spec)
    rows = resolve_rows(spec)
    scores: dict[tuple[str, str], float] = {}
    why: dict[tuple[str, str], str] = {}
    runs_out = []
    command = f"python reproduce/run.py --compare {spec.path} --work-dir {work_dir}"
    for row in rows:
        for run in row.runs:
            for b, d in datasets.items():
                key, value, reason, path = (run.entry, b), None, "", None
                stale = None if run.blocked else record_mismatch(work_dir, run.entry)
                if run.blocked:
                    reason = f"blocked: {run.blocked}"
                elif stale:
                    reason = f"stale: {stale}"
                else:
                    path = find_score_file(work_dir, run.entry, d)
                    if path is None:
                        failed = _failure(work_dir, run.entry, d)
                        reason = f"failed: {failed}" if failed else f"not run yet ({command})"
                    else:
                        try:
                            unit = _mme_unit(run.entry, mme) if d == "MME" else "perception"
                            value = read_score_file(path, d, unit)
                        except InputError as exc:
                            reason = f"unreadable score file: {exc}"
                if value is None:
                    why[key] = reason
                else:
                    scores[key] = value
                runs_out.append({"row": row.label, "entry": run.entry, "seed": run.seed, "benchmark": b,
                                 "dataset": d, "score": value, "reason": reason,
                                 "file": "" if path is None else str(path)})
    table_rows = []
    bases = {r.model: r for r in rows if r.base}
    for row in rows:
        first = next((r.entry for r in row.runs if not r.blocked), row.runs[0].entry)
        tf, ratio, tf_reason = _tflops(first)
        cells = {b: _stat(row, b, scores, why) for b in datasets}
        table_rows.append(TableRow(row, tf, ratio, tf_reason, cells, _rel(row, bases[row.model], list(datasets),
                                                                          scores, why)))
    return CompareTable(spec, tuple(datasets), table_rows, runs_out)


def _seed_name(run: Run) -> str:
    return run.entry if run.seed is None else f"seed {run.seed}"


def _stat(row: Row, bench: str, scores: dict, why: dict) -> Stat:
    values = [scores[(r.entry, bench)] for r in row.runs if (r.entry, bench) in scores]
    lacking = [f"{_seed_name(r)}: {why[(r.entry, bench)]}" for r in row.runs if (r.entry, bench) not in scores]
    return Stat.of(values, len(row.runs), "; ".join(_merge_reasons(lacking, len(row.runs))))


def _merge_reasons(items: list[str], total: int) -> list[str]:
    """`seed 0: X; seed 1: X` -> `X` when every run lacks the value for the same reason."""
    reasons = {i.split(": ", 1)[1] if ": " in i else i for i in items}
    if len(items) == total and len(reasons) == 1:
        return list(reasons)
    return items


def _rel(row: Row, base: Row, benchmarks: list[str], scores: dict, why: dict) -> Stat:
    """Rel. Avg. of every run of `row` that has all benchmarks, against the base run, then mean +- std."""
    from reproduce.relavg import rel_avg

    (base_run,) = base.runs
    no_base = [b for b in benchmarks if (base_run.entry, b) not in scores]
    if no_base:
        reason = "; ".join(f"{b}: {why[(base_run.entry, b)]}" for b in no_base)
        return Stat(None, status="undefined", reason=f"base {base.label} has no score on {reason}")
    base_scores = {b: scores[(base_run.entry, b)] for b in benchmarks}
    zero = [b for b, v in base_scores.items() if v == 0]
    if zero:
        return Stat(None, status="undefined",
                    reason=f"base {base.label} scores 0 on {', '.join(zero)}: the ratio is undefined")
    values, lacking = [], []
    for run in row.runs:
        have = {b: scores[(run.entry, b)] for b in benchmarks if (run.entry, b) in scores}
        if len(have) == len(benchmarks):
            values.append(rel_avg(have, base_scores, benchmarks))
        else:
            lacking.append(f"{_seed_name(run)}: lacks {', '.join(b for b in benchmarks if b not in have)}")
    return Stat.of(values, len(row.runs), "; ".join(lacking))


# ------------------------------------------------------------------------------------------ rendering
def _fmt_stat(s: Stat, of_n: int, digits: int, pct: bool = False) -> str:
    unit = "%" if pct else ""
    text = f"{s.mean:.{digits}f}{unit}"
    if s.std is not None:
        text += f" ± {s.std:.{digits}f}"
    if s.n < of_n:
        text += f" (n={s.n})"
    return text


def to_markdown(table: CompareTable) -> str:
    """The table in markdown; missing / undefined cells point to numbered reasons below it."""
    notes: dict[str, int] = {}

    def ref(reason: str) -> str:
        return f"[{notes.setdefault(reason, len(notes) + 1)}]"

    head = ["Entry", "Method", "Budget", "TFLOPs", "% full", "n", *table.benchmarks, REL_AVG]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for tr in table.rows:
        row, n = tr.row, len(tr.row.runs)
        budget = "-" if row.budget is None else f"{100 * row.budget:g}%"
        tf = f"{tr.tflops:.4g}" if tr.tflops is not None else f"- {ref(tr.tflops_reason)}"
        pct = f"{100 * tr.ratio:.1f}" if tr.ratio is not None else "-"
        cells = [row.label, row.method, budget, tf, pct, str(n)]
        for s, digits, is_pct in [(tr.cells[b], 2, False) for b in table.benchmarks] + [(tr.rel, 1, True)]:
            if s.mean is None:
                cells.append(f"{s.status} {ref(s.reason)}")
            else:
                cells.append(_fmt_stat(s, n, digits, is_pct) + (f" {ref(s.reason)}" if s.reason else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± sample std over seeds (n = runs with a value); TFLOPs: analytic prefill count of the "
                 f"entry; {REL_AVG}: 100 x mean over benchmarks of score / the model's full score, per run.")
    for reason, i in notes.items():
        lines.append(f"[{i}] {reason}")
    return "\n".join(lines)


def _csv(table: CompareTable) -> str:
    import pandas as pd

    out = []
    for tr in table.rows:
        rec = {"model": tr.row.model, "method": tr.row.method, "budget": tr.row.budget, "entry": tr.row.label,
               "runs": len(tr.row.runs), "tflops": tr.tflops, "tflops_ratio": tr.ratio}
        for name, s in [(b, tr.cells[b]) for b in table.benchmarks] + [("rel_avg", tr.rel)]:
            rec.update({name: s.mean, f"{name}_std": s.std, f"{name}_n": s.n, f"{name}_status": s.status,
                        f"{name}_reason": s.reason})
        out.append(rec)
    return pd.DataFrame(out).to_csv(index=False)


def _figure(table: CompareTable, column: str | None) -> tuple[bytes, bytes]:
    """Accuracy (column = a benchmark) or Rel. Avg. (None) against TFLOPs: one line per (model,) method,
    error bars = std over seeds, the full model as a star. (PNG, SVG) bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    several = len(table.spec.models) > 1
    lines: dict[tuple[str, str], list] = {}
    for tr in table.rows:
        s = tr.rel if column is None else tr.cells[column]
        if s.mean is None or tr.tflops is None:
            continue
        lines.setdefault((tr.row.model, tr.row.method), []).append((tr.tflops, s.mean, s.std or 0.0))
    for (model, method), pts in lines.items():
        pts.sort()
        xs, ys, es = zip(*pts)
        label = f"{model} {method}" if several else method
        if method == FULL:
            ax.plot(xs, ys, "*", ms=12, label=label)
        else:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, label=label)
    if lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no value to plot (see the table's notes)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("TFLOPs (analytic prefill count)")
    ax.set_ylabel(f"{REL_AVG} (%)" if column is None else f"{column} score")
    ax.set_title(f"{table.spec.name}: {REL_AVG if column is None else column} vs TFLOPs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        out.append(buf.getvalue())
    return out[0], out[1]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def outputs(table: CompareTable, out_dir: Path) -> dict[Path, bytes]:
    """Every output file, rendered in memory (an error cannot leave half of them written): NAME.md, NAME.csv
    (one line per row, full precision), NAME_runs.csv (one line per run and benchmark: score or reason, the
    file read), NAME_<benchmark>.png/.svg and NAME_rel_avg.png/.svg."""
    import pandas as pd

    name = table.spec.name
    files = {out_dir / f"{name}.md": (to_markdown(table) + "\n").encode(),
             out_dir / f"{name}.csv": _csv(table).encode(),
             out_dir / f"{name}_runs.csv": pd.DataFrame(table.runs).to_csv(index=False).encode()}
    for column, stem in [(b, _slug(b)) for b in table.benchmarks] + [(None, "rel_avg")]:
        png, svg = _figure(table, column)
        files[out_dir / f"{name}_{stem}.png"] = png
        files[out_dir / f"{name}_{stem}.svg"] = svg
    return files


def default_out(spec: CompareSpec, work_dir: str | Path) -> Path:
    """Where aggregate.py --compare writes unless --out says otherwise: <work-dir>/comparisons/<name>/."""
    return Path(work_dir) / "comparisons" / spec.name


def main_aggregate(spec_path: str, work_dir: str, out: str | None, mme: str) -> int:
    """`aggregate.py --compare`: print the table, write its files; 2 with one error line for bad input."""
    from vlmeval_dop.fileio import check_writable_dir
    from vlmeval_dop.plugins import PluginError

    try:
        spec = prepare(spec_path)
        if not Path(work_dir).is_dir():
            raise SpecError(f"work dir {work_dir!r} not found (the --work-dir given to reproduce/run.py --compare)")
        out_dir = Path(out) if out else default_out(spec, work_dir)
        check_writable_dir(out_dir, "--out")
        table = compare_table(spec, work_dir, mme)
        files = outputs(table, out_dir)
    except (ValueError, PluginError) as exc:  # SpecError, InputError, FileFormatError; a broken installed plugin
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        path.write_bytes(data)
    print(f"wrote {len(files)} files to {out_dir}", file=sys.stderr)
    return 0

