"""Declarative registry of every table of the paper (Tables 1-30) and the paper's published numbers.

`TABLES[n]` is a `TableSpec`: what table n shows (kind, models, rows, columns), where its transcribed
numbers live (`reproduce/paper_tables/table_NN.csv`, format in that folder's README.md) and, in `notes` /
`missing`, what this framework cannot run for it. `ERRATA` lists the inconsistencies of the paper
(documented in reproduce/PAPER_ERRATA.md); `read_paper_table(n, corrected=True)` applies the certain ones.

Row names. A row is an entry name of DESIGN.md (`llava15_7b`, `llava15_7b_dopcd28`, ...), optionally followed
by the search/evaluation configuration that differs from the paper's default, in brackets:
`llava15_7b_dopcd28[val=SEED]`, `llava15_7b[prune=MHA;eval=TextVQA]`. Defaults (no bracket): policy searched
on 100 TextVQA training samples (seed 42) with the KL objective and the additive approximation, visual
token group only, own divergences (no transfer). `parse_row` splits a row name; the keys are listed in
`CONFIG_KEYS`.

No vlmeval import (pandas is imported lazily, only by the CSV readers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_TABLES_DIR = Path(__file__).resolve().parent / "paper_tables"

# DESIGN.md's short benchmark aliases, in the paper's column order.
BENCHMARKS = ("VQAv2", "GQA", "VizWiz", "SQA", "SEED", "TextVQA", "POPE", "MME", "MMB", "MMB-CN",
              "AI2D", "ChartQA", "OCRBench")
LLAVA_BENCHMARKS = ("VQAv2", "GQA", "VizWiz", "SQA", "SEED", "TextVQA", "POPE", "MME", "MMB", "MMB-CN")
QI_BENCHMARKS = ("TextVQA", "ChartQA", "AI2D", "OCRBench", "MME", "MMB", "MMB-CN")  # Qwen2.5-VL / InternVL3
CAPTION_BENCHMARKS = ("NoCaps", "TextCaps")  # Table 17 (plugin datasets NoCaps_VAL / TextCaps_VAL)
# Table 18 (plugin video datasets TGIF_QA / MSVD_QA / MSRVTT_QA); each has two columns, `<b>_acc` and `<b>_score`
VIDEO_BENCHMARKS = ("TGIF-QA", "MSVD-QA", "MSRVTT-QA")
VIDEO_METRICS = ("acc", "score")

MODELS = ("llava15_7b", "llava15_13b", "llavanext_7b", "llavanext_13b", "qwen25vl_7b", "internvl3_8b")
# Models of the paper beyond the six main ones: entries of this framework whose DOP policies are not
# published (Table 18's come from `vlmeval-dop search --install`, see reproduce/run.py VIDEO_SEARCH).
VIDEO_MODELS = ("videollava_7b",)
# Models of the paper that are not entries of this framework (their rows are data only): none left.
EXTERNAL_MODELS: dict[str, str] = {}
DOP_METHODS = ("dop", "dopv", "dopcd", "dopr")
BASELINE_METHODS = ("fastv", "pdrop", "fitprune", "sparsevlm", "prumergeplus", "visionzip", "trim", "dart",
                    "divprune", "vispruner", "cdpruner", "resize")
METHODS = DOP_METHODS + BASELINE_METHODS

KINDS = {
    "accuracy": "benchmark scores of entries at TFLOPs budgets, with Rel. Avg.",
    "efficiency": "measured latency / wall time on a GPU",
    "search_setup": "search configuration (sampling points)",
    "spearman": "rank correlation of the additive approximation with the joint divergence",
    "search_cost": "one-time cost of the divergence profiling",
    "policy": "searched DOP policies (d_A, d_P, n_v)",
    "captioning": "long-form captioning scores (CIDEr)",
    "video": "video QA on Video-LLaVA",
    "search_ablation": "searches under a non-default configuration and their evaluation",
    "depth_redundancy": "pruning single / consecutive operations at chosen layers",
    "perturbation": "random non-depth-wise perturbations of a DOP policy",
}

# Keys allowed in a row's bracketed configuration, and what they mean.
CONFIG_KEYS = {
    "val": "benchmark the policy was searched on (default TextVQA)",
    "samples": "number of validation samples of the search (default 100)",
    "val_seeds": "number of random validation sets the statistic is taken over (default: one, seed 42)",
    "transfer_from": "model whose individual divergences were transferred (Eq. 12) instead of profiling",
    "search": "grid_additive / grid_joint: optimum on the Appendix F.3 grid with D_sum / the joint D",
    "objective": "accuracy_drop: Eq. 13 instead of the KL divergence",
    "groups": "visual+system: also prune system-token operations (Eq. 14)",
    "impl": "reproduced: the paper authors' own CDPruner reproduction on Qwen2.5-VL (Table 19)",
    "prune": "MHA / MLP: module whose visual-token operations are pruned at the column's layers (1-based)",
    "eval": "benchmark the row is evaluated on",
    "swap": "<k><MHA|MLP>: k kept and k pruned operations of that module swapped at random (10 draws)",
    "stat": "best / mean over the random draws",
}


@dataclass(frozen=True)
class TableSpec:
    """One table of the paper.

    Attributes:
        number: the table number (1-30).
        title: short title (the caption's gist).
        kind: one of KINDS.
        models: model names involved (MODELS, VIDEO_MODELS or EXTERNAL_MODELS keys).
        rows: the row names, in the paper's order; identical to the CSV's `row` column.
        columns: the CSV's value columns (benchmark aliases for scores; measurement names otherwise),
            in order, after the leading `row`, `label` (and `budget`) columns.
        csv: path of the transcribed numbers, relative to the repository root.
        notes: where the numbers come from and, precisely, what this framework cannot run or reproduce.
        budgets: the TFLOPs budget labels (fractions) the table uses.
        base_row: for tables with `rel_avg`: the row whose cells are the denominators (the upper bound),
            in table `base_table` (default: this table). None where the printed Rel. Avg. cannot be
            recomputed from printed cells (Tables 5, 21).
        base_table: table holding `base_row` when it is not this one (Table 4 -> Table 8).
        units: column -> unit, where it is not "percent".
        missing: short statements of what cannot be run here (empty: every row is runnable in principle).
    """

    number: int
    title: str
    kind: str
    models: tuple[str, ...]
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    notes: str
    budgets: tuple[float, ...] = ()
    base_row: str | None = None
    base_table: int | None = None
    units: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    @property
    def csv(self) -> str:
        """The CSV's path relative to the repository root."""
        return f"reproduce/paper_tables/table_{self.number:02d}.csv"

    @property
    def path(self) -> Path:
        """Absolute path of the CSV."""
        return REPO_ROOT / self.csv

    @property
    def has_budget(self) -> bool:
        """Whether the CSV has a `budget` column (the table's rows are at TFLOPs budgets)."""
        return bool(self.budgets)

    @property
    def header(self) -> tuple[str, ...]:
        """The CSV's full header: row, label, [budget,] columns."""
        return ("row", "label") + (("budget",) if self.has_budget else ()) + self.columns

    @property
    def benchmarks(self) -> tuple[str, ...]:
        """The benchmark aliases of the value columns (the cells a Rel. Avg. is computed from; for Table 18
        the video benchmarks, each printed as two columns `<b>_acc` and `<b>_score`)."""
        out: list[str] = []
        for c in self.columns:
            name = c.rsplit("_", 1)[0] if c.rsplit("_", 1)[-1] in VIDEO_METRICS else c
            if (c in BENCHMARKS or c in CAPTION_BENCHMARKS or name in VIDEO_BENCHMARKS) and name not in out:
                out.append(name)
        return tuple(out)

    @property
    def has_rel_avg(self) -> bool:
        """Whether the paper prints a Rel. Avg. column."""
        return "rel_avg" in self.columns

    @property
    def runnable(self) -> bool:
        """False when the table needs something this framework does not have (see `missing`)."""
        return not self.missing


# ----------------------------------------------------------------------------------------- row helpers
def _grid(model: str, sections: list[tuple[int, list[str]]], base: bool = True) -> tuple[str, ...]:
    """The rows of an accuracy table: the unpruned model, then `{model}_{method}{budget}` per section."""
    rows = [model] if base else []
    for budget, methods in sections:
        rows += [f"{model}_{m}{budget}" for m in methods]
    return tuple(rows)


_ALL13 = ["fastv", "pdrop", "fitprune", "sparsevlm", "prumergeplus", "trim", "visionzip", "dart", "divprune",
          "vispruner", "dopv", "cdpruner", "dopcd"]
_NO_FITPRUNE = [m for m in _ALL13 if m != "fitprune"]
_LOW = ["prumergeplus", "trim", "visionzip", "dart", "divprune", "vispruner", "dopv", "cdpruner", "dopcd"]
_QI = ["fastv", "divprune", "cdpruner", "resize", "dopr"]

# Shared notes, phrased once.
_LLAVA_NOTES = (
    "Baseline cells are mostly copied by the paper from VisPruner/CDPruner (official LLaVA evaluation "
    "scripts, original LLaVA checkpoints); SEED baselines and FitPrune were run by the authors (App. D.4.1). "
    "This framework evaluates llava-hf checkpoints through VLMEvalKit, so cells are comparable in trend, "
    "not digit for digit. VQAv2 is test-dev: answers are not public, the VQAv2_TestDev plugin dataset "
    "writes an EvalAI submission and has no local score (VQAv2_VAL is a local proxy on another split). "
    "VizWiz is the test split in the paper (server-scored); VLMEvalKit's VizWiz TSV carries answers, i.e. "
    "another split. POPE is F1 (%). Baseline entries need the baselines of DESIGN.md "
    "(vlmeval_dop.baselines / reducers); `vlmeval-dop list` says which entries are runnable."
)
_LLAVA_UNITS = {"MME": "perception score (0-2000)"}
_QI_UNITS = {"MME": "perception + reasoning (0-2800)", "OCRBench": "score (0-1000)"}
_QI_NOTES = (
    "FastV, DivPrune and CDPruner cells are copied from CDPruner (Zhang et al., 2025), which released no "
    "Qwen2.5-VL/InternVL3 code (App. D.4.2); Resizing and DOP_R were evaluated by the authors with VLMEvalKit. "
    "Resizing keeps n_v*784 input pixels (App. D.4.2). MMB = MMBench-EN."
)


TABLES: dict[int, TableSpec] = {}


def _add(spec: TableSpec) -> None:
    assert spec.number not in TABLES, spec.number
    assert spec.kind in KINDS, spec.kind
    TABLES[spec.number] = spec


# ------------------------------------------------------------------------------------- main-text tables
_add(TableSpec(
    1, "Performance comparison on LLaVA-1.5-7B (selection of Table 8)", "accuracy", ("llava15_7b",),
    _grid("llava15_7b", [(28, ["fastv", "fitprune", "divprune", "vispruner", "dopv", "cdpruner", "dopcd"]),
                         (23, ["divprune", "vispruner", "dopv", "cdpruner", "dopcd"])]),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "Every row is repeated in Table 8 with identical cells. " + _LLAVA_NOTES,
    budgets=(0.28, 0.23), base_row="llava15_7b", units=_LLAVA_UNITS,
))
_add(TableSpec(
    2, "Performance comparison on LLaVA-NeXT-7B (selection of Table 10)", "accuracy", ("llavanext_7b",),
    _grid("llavanext_7b", [(14, ["fastv", "divprune", "vispruner", "dopv", "cdpruner", "dopcd"]),
                           (9, ["divprune", "vispruner", "dopv", "cdpruner", "dopcd"])]),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "Every row is repeated in Table 10 with identical cells. LLaVA-NeXT at a fixed 672x672 input (5 crops x "
    "576 = 2880 visual tokens in the paper's count). " + _LLAVA_NOTES,
    budgets=(0.14, 0.09), base_row="llavanext_7b", units=_LLAVA_UNITS,
))
_add(TableSpec(
    3, "Efficiency and cost on an NVIDIA A100-80G (5000 TextVQA samples)", "efficiency",
    ("llava15_7b", "llavanext_7b"),
    ("llava15_7b", "llava15_7b_cdpruner28", "llavanext_7b", "llavanext_7b_cdpruner14", "llavanext_7b_dopcd14"),
    tuple(f"{m}_{a}" for m in ("prefill_ms", "sample_ms", "total_min") for a in ("eager", "sdpa", "fa2"))
    + ("cost_min",),
    "Average prefill and per-sample latency (ms) and total time (min) over 5000 TextVQA samples with the "
    "eager / SDPA / FlashAttention-2 attention implementations; cost_min = one-time divergence profiling on "
    "100 TextVQA samples with eager attention (empty where the paper prints '-'). The paper prints no "
    "DOP row for LLaVA-1.5-7B and says DOP_V has the same efficiency as DOP_CD. Timings are hardware "
    "measurements: on other GPUs only ratios are comparable. flash_attention_2 rows need the flash-attn "
    "package installed.",
    budgets=(0.28, 0.14), units={c: "ms" for c in ("prefill_ms_eager", "prefill_ms_sdpa", "prefill_ms_fa2",
                                                    "sample_ms_eager", "sample_ms_sdpa", "sample_ms_fa2")}
    | {"total_min_eager": "min", "total_min_sdpa": "min", "total_min_fa2": "min", "cost_min": "min"},
))
_add(TableSpec(
    4, "Cross-task generalization: DOP_CD on LLaVA-1.5-7B at 28% searched on other tasks", "search_ablation",
    ("llava15_7b",),
    ("llava15_7b_dopcd28", "llava15_7b_dopcd28[val=SEED]", "llava15_7b_dopcd28[val=VQAv2]"),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "Policies searched on 100 samples of TextVQA / SeedBench / VQAv2 (the policies are in Table 20); "
    "evaluated on Table 8's benchmarks, Rel. Avg. relative to Table 8's LLaVA-1.5-7B row. The TextVQA row "
    "is Table 8's DOP_CD 28% row. SEED has no training split: which SEED samples were used is not said. "
    + _LLAVA_NOTES,
    budgets=(0.28,), base_row="llava15_7b", base_table=8, units=_LLAVA_UNITS,
))
_add(TableSpec(
    5, "Cross-model generalization: divergences transferred from LLaVA-1.5-7B (Rel. Avg.)", "search_ablation",
    ("llava15_13b", "llavanext_7b", "llavanext_13b", "qwen25vl_7b", "internvl3_8b"),
    ("llava15_13b_dopcd28", "llava15_13b_dopcd28[transfer_from=llava15_7b]",
     "llavanext_7b_dopcd14", "llavanext_7b_dopcd14[transfer_from=llava15_7b]",
     "llavanext_13b_dopcd14", "llavanext_13b_dopcd14[transfer_from=llava15_7b]",
     "qwen25vl_7b_dopr26", "qwen25vl_7b_dopr26[transfer_from=llava15_7b]",
     "internvl3_8b_dopr27", "internvl3_8b_dopr27[transfer_from=llava15_7b]"),
    ("rel_avg",),
    "Only Rel. Avg. is printed, each over that model's benchmark set (Tables 9-13); the Direct rows equal "
    "those tables' DOP rows. Transfer: LLaVA-1.5-7B's DOP_CD individual divergences rescaled by Eq. 12 (also "
    "onto DOP_R for Qwen2.5-VL / InternVL3). The transferred policies are not printed.",
    budgets=(0.28, 0.14, 0.26, 0.27),
))

# ------------------------------------------------------------------------------------ appendix tables
_add(TableSpec(
    6, "Sampling points of the individual divergences", "search_setup", MODELS, MODELS,
    ("L", "N_v", "depth_samples", "visual_samples"),
    "depth_samples / visual_samples: the sampled d_A (= d_P) and n_v values, space-separated, as printed. "
    "Transcribed as printed: InternVL3-8B N_v = 1008 contradicts App. D.1 and Table 16 (1280); see ERRATA. "
    "eval_configs/models.yaml holds the corrected values.",
))
_add(TableSpec(
    7, "Spearman correlation of D_sum with the joint divergence D (216 combinations)", "spearman",
    ("llava15_7b", "llavanext_7b"), ("llava15_7b", "llavanext_7b"), ("spearman_rho", "p_value"),
    "All 6x6x6 combinations of the sampled d_A, d_P, n_v (Table 6), divergences on the same 100 TextVQA "
    "samples; scipy.stats.spearmanr. `vlmeval-dop search --spearman 216` measures the 216 joint divergences "
    "(prefix sharing) and writes rho and the p-value to search.json.",
))
_add(TableSpec(
    8, "Performance on LLaVA-1.5-7B under different budgets (full)", "accuracy", ("llava15_7b",),
    _grid("llava15_7b", [(37, _ALL13), (28, _ALL13), (23, _LOW)]),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "The table's 'Lower Bound: Retain 18.6% TFLOPs (= 0 Visual Token)' header has no row of numbers. "
    + _LLAVA_NOTES,
    budgets=(0.37, 0.28, 0.23), base_row="llava15_7b", units=_LLAVA_UNITS,
))
_add(TableSpec(
    9, "Performance on LLaVA-1.5-13B under different budgets", "accuracy", ("llava15_13b",),
    _grid("llava15_13b", [(37, _NO_FITPRUNE), (28, _NO_FITPRUNE), (23, _LOW)]),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "No FitPrune rows (the authors ran FitPrune on LLaVA-1.5-7B only). The 'Lower Bound: 18.6%' header has "
    "no row of numbers. " + _LLAVA_NOTES,
    budgets=(0.37, 0.28, 0.23), base_row="llava15_13b", units=_LLAVA_UNITS,
))
_add(TableSpec(
    10, "Performance on LLaVA-NeXT-7B under different budgets (full)", "accuracy", ("llavanext_7b",),
    _grid("llavanext_7b", [(23, _NO_FITPRUNE), (14, _NO_FITPRUNE), (9, _LOW)]),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "LLaVA-NeXT at a fixed 672x672 input (2880 visual tokens in the paper's count; llava-hf inserts 48 "
    "row-newline tokens more). " + _LLAVA_NOTES,
    budgets=(0.23, 0.14, 0.09), base_row="llavanext_7b", units=_LLAVA_UNITS,
))
_add(TableSpec(
    11, "Performance on LLaVA-NeXT-13B under different budgets", "accuracy", ("llavanext_13b",),
    _grid("llavanext_13b", [(23, _NO_FITPRUNE), (14, _NO_FITPRUNE), (9, _LOW)]),
    LLAVA_BENCHMARKS + ("rel_avg",),
    "The upper-bound header says 576 visual tokens; it is 2880 (see ERRATA). " + _LLAVA_NOTES,
    budgets=(0.23, 0.14, 0.09), base_row="llavanext_13b", units=_LLAVA_UNITS,
))
_add(TableSpec(
    12, "Performance on Qwen2.5-VL-7B under different budgets", "accuracy", ("qwen25vl_7b",),
    _grid("qwen25vl_7b", [(43, _QI), (26, _QI), (16, _QI)]),
    QI_BENCHMARKS + ("rel_avg",),
    "100% = 1008x1008 input, 1296 visual tokens (1,016,064 pixels). " + _QI_NOTES,
    budgets=(0.43, 0.26, 0.16), base_row="qwen25vl_7b", units=_QI_UNITS,
))
_add(TableSpec(
    13, "Performance on InternVL3-8B under different budgets", "accuracy", ("internvl3_8b",),
    _grid("internvl3_8b", [(27, _QI), (18, _QI)]),
    QI_BENCHMARKS + ("rel_avg",),
    "100% = 896x896 input, 1280 visual tokens. " + _QI_NOTES,
    budgets=(0.27, 0.18), base_row="internvl3_8b", units=_QI_UNITS,
))
_add(TableSpec(
    14, "One-time optimization cost (divergence profiling on 100 TextVQA samples, A100-80G)", "search_cost",
    MODELS, MODELS, ("cost_min",),
    "Minutes for the 3I+1 = 19 validation runs (first output token only) on the paper's A100-80G; "
    "timings on other hardware are comparable only as ratios.",
    units={"cost_min": "min"},
))
_add(TableSpec(
    15, "DOP_CD policies of the LLaVA models", "policy",
    ("llava15_7b", "llava15_13b", "llavanext_7b", "llavanext_13b"),
    ("llava15_7b",) + tuple(f"llava15_7b_dopcd{b}" for b in (37, 28, 23))
    + ("llava15_13b",) + tuple(f"llava15_13b_dopcd{b}" for b in (37, 28, 23))
    + ("llavanext_7b",) + tuple(f"llavanext_7b_dopcd{b}" for b in (23, 14, 9))
    + ("llavanext_13b",) + tuple(f"llavanext_13b_dopcd{b}" for b in (23, 14, 9)),
    ("d_A", "d_P", "n_v"),
    "Transcribed as printed, including d_A = 340 for llavanext_13b_dopcd23 (it is 34, see ERRATA; "
    "read_paper_table(15, corrected=True) and eval_configs/policies.yaml carry 34). The paper says DOP_V "
    "policies are 'basically identical' but does not print them; this framework uses these for DOP_V too.",
    budgets=(0.37, 0.28, 0.23, 0.14, 0.09),
))
_add(TableSpec(
    16, "DOP_R policies of Qwen2.5-VL-7B and InternVL3-8B", "policy", ("qwen25vl_7b", "internvl3_8b"),
    ("qwen25vl_7b", "qwen25vl_7b_dopr43", "qwen25vl_7b_dopr26", "qwen25vl_7b_dopr16",
     "internvl3_8b", "internvl3_8b_dopr27", "internvl3_8b_dopr18"),
    ("d_A", "d_P", "n_v"),
    "n_v is the visual token count after resizing (input pixels = n_v * 784).",
    budgets=(0.43, 0.26, 0.16, 0.27, 0.18),
))
_add(TableSpec(
    17, "Image captioning (CIDEr) on LLaVA-1.5-7B", "captioning", ("llava15_7b",),
    ("llava15_7b", "llava15_7b_cdpruner28", "llava15_7b_dopcd28", "llava15_7b_cdpruner23", "llava15_7b_dopcd23"),
    ("NoCaps", "TextCaps"),
    "CIDEr-D on a 0-1 scale (not x100), evaluated by the authors with lmms-eval (nocaps_val, textcaps_val; "
    "prompt 'Provide a one-sentence caption for the provided image.'); the DOP rows are labelled 'DOP_C' "
    "(DOP_CD, see ERRATA). NoCaps_VAL / TextCaps_VAL are plugin datasets (vlmeval_dop/captioning.py, "
    "scored with its own CIDEr-D: `_score.json` key 'CIDEr'). The user must provide the official files and "
    "build the TSVs once: `python -m vlmeval_dop.datasets prepare-captions --dataset nocaps --annotations "
    "nocaps_val_4500_captions.json --images <NoCaps val images>` and `... --dataset textcaps --annotations "
    "TextCaps_0.1_val.json --images <TextCaps train_images/>`; then `python run.py --model <rows> --data "
    "NoCaps TextCaps`. The PTB tokenisation is a Python approximation of coco-caption's Java one (CIDEr "
    "can differ in the third decimal).",
    budgets=(0.28, 0.23), units={"NoCaps": "CIDEr (0-1 scale)", "TextCaps": "CIDEr (0-1 scale)"},
))
_add(TableSpec(
    18, "Video QA on Video-LLaVA-7B (VisPruner vs DOP + VisPruner)", "video", ("videollava_7b",),
    ("videollava_7b", "videollava_7b_vispruner16", "videollava_7b_dopv16",
     "videollava_7b_vispruner11", "videollava_7b_dopv11"),
    tuple(f"{b}_{m}" for b in ("TGIF-QA", "MSVD-QA", "MSRVTT-QA", "avg") for m in ("acc", "score")),
    "Video-LLaVA-7B, 8 frames x 256 = 2048 visual tokens, first 1K samples of each benchmark, VisPruner's "
    "video protocol: Video-LLaVA's GPT-assisted evaluation (the judge answers yes/no and a 0-5 score; acc = "
    "% yes, score = mean). Plugin video datasets TGIF_QA / MSVD_QA / MSRVTT_QA (vlmeval_dop/video_qa.py, "
    "built with `python -m vlmeval_dop.datasets prepare-video-qa`), judged through VLMEvalKit's build_judge "
    "(default gpt-3.5-turbo, the model of Video-LLaVA's scripts; the paper does not name its judge, and the "
    "unversioned alias has changed over time, so scores compare in trend). The DOP + VisPruner policies are "
    "not published: they are searched (reproduce/run.py prints the command). avg_* are the means of the "
    "three benchmarks (they recompute from the printed cells); `reproduce/aggregate.py --paper-table 18`.",
    budgets=(0.16, 0.11), units={f"{b}_score": "GPT score (0-5)" for b in ("TGIF-QA", "MSVD-QA", "MSRVTT-QA", "avg")},
))
_add(TableSpec(
    19, "CDPruner on Qwen2.5-VL-7B: CDPruner's reported numbers vs the authors' reproduction, + DOP",
    "accuracy", ("qwen25vl_7b",),
    ("qwen25vl_7b", "qwen25vl_7b_cdpruner26", "qwen25vl_7b_cdpruner26[impl=reproduced]",
     "qwen25vl_7b_dopcd26[impl=reproduced]", "qwen25vl_7b_cdpruner16", "qwen25vl_7b_cdpruner16[impl=reproduced]",
     "qwen25vl_7b_dopcd16[impl=reproduced]"),
    QI_BENCHMARKS + ("rel_avg",),
    "'CDPruner (paper)' rows are CDPruner's reported numbers (= Table 12's rows); '[impl=reproduced]' rows "
    "use the DOP authors' unreleased CDPruner port to Qwen2.5-VL, so this framework's cdpruner reducer "
    "gives a third implementation. The DOP_CD policies for Qwen2.5-VL used here are not published; "
    "they have to be searched (vlmeval-dop search --reducer cdpruner).",
    budgets=(0.26, 0.16), base_row="qwen25vl_7b", units=_QI_UNITS,
    missing=("rows [impl=reproduced]: the DOP authors' CDPruner port to Qwen2.5-VL (unreleased); this "
             "framework's cdpruner reducer can only stand in for it",),
))
_add(TableSpec(
    20, "Policies searched on different tasks (LLaVA-1.5-7B, DOP_CD)", "search_ablation", ("llava15_7b",),
    tuple(f"llava15_7b_dopcd{b}{c}" for b in (37, 28, 23) for c in ("", "[val=VQAv2]", "[val=SEED]")),
    ("d_A", "d_P", "n_v"),
    "The TextVQA rows are Table 15's policies. The searches on VQAv2 / SeedBench use 100 samples of those "
    "benchmarks; the samples themselves are not published.",
    budgets=(0.37, 0.28, 0.23),
))
_add(TableSpec(
    21, "Optimization efficiency: number of validation samples (LLaVA-1.5-7B, 28%)", "search_ablation",
    ("llava15_7b",),
    tuple(f"llava15_7b_dopcd28[samples={n}]" for n in (10, 25, 50)) + ("llava15_7b_dopcd28",)
    + tuple(f"llava15_7b_dopcd28[samples={n}]" for n in (200, 500)) + ("llava15_7b_cdpruner28",),
    ("cost_min", "rel_avg"),
    "Rel. Avg. over Table 8's benchmarks relative to Table 8's LLaVA-1.5-7B row; only the aggregate is "
    "printed (the 100-sample and CDPruner rows equal Table 8's). cost_min is A100-80G time (empty for "
    "CDPruner, printed '-'); the random subsets are not published.",
    budgets=(0.28,), units={"cost_min": "min"},
))
_add(TableSpec(
    22, "Additive approximation vs joint-divergence grid search (LLaVA-1.5-7B)", "search_ablation",
    ("llava15_7b",),
    ("llava15_7b_dopcd28[search=grid_additive]", "llava15_7b_dopcd28[search=grid_joint]",
     "llava15_7b_dopcd23[search=grid_additive]", "llava15_7b_dopcd23[search=grid_joint]"),
    ("d_A", "d_P", "n_v", "TextVQA", "GQA", "SEED"),
    "Grid of App. F.3 (depths every 2 layers, n_v every 16 tokens; 658 / 384 feasible policies at 28% / "
    "23%). The printed policies can be evaluated directly; the 'w/ Additive' policies differ from Table 15 "
    "and the grid's parity is inconsistent with the text (see ERRATA). `vlmeval-dop search --joint-grid` / "
    "`--grid-additive` search this framework's own rows (docs/search.md).",
    budgets=(0.28, 0.23),
))
_add(TableSpec(
    23, "Robustness over 5 random validation sets (LLaVA-1.5-7B, DOP_CD)", "search_ablation", ("llava15_7b",),
    ("llava15_7b_dopcd28[val_seeds=5]", "llava15_7b_dopcd23[val_seeds=5]"),
    ("TextVQA", "TextVQA_std", "GQA", "GQA_std", "SEED", "SEED_std"),
    "Mean and standard deviation over 5 searches, each on 100 TextVQA samples drawn with a different seed; "
    "the seeds are not published, so only the statistics are comparable (reproduce/run.py uses seeds 0-4).",
    budgets=(0.28, 0.23),
))
_add(TableSpec(
    24, "KL divergence vs accuracy-drop objective (LLaVA-1.5-7B)", "search_ablation", ("llava15_7b",),
    ("llava15_7b_cdpruner28", "llava15_7b_dopcd28", "llava15_7b_dopcd28[objective=accuracy_drop]",
     "llava15_7b_cdpruner23", "llava15_7b_dopcd23", "llava15_7b_dopcd23[objective=accuracy_drop]"),
    ("TextVQA", "GQA", "SEED"),
    "The model is not named in the table; the cells equal Table 8's LLaVA-1.5-7B CDPruner / DOP_CD rows, and "
    "the DOP rows are mislabelled 'DOP_R' (see ERRATA). App. F.5 says the accuracy objective was optimized "
    "on 100 TextVQA *validation* samples.",
    budgets=(0.28, 0.23),
))
_add(TableSpec(
    25, "Pruning system-token operations too (LLaVA-1.5-7B, DOP_CD)", "search_ablation", ("llava15_7b",),
    ("llava15_7b_dopcd28", "llava15_7b_dopcd28[groups=visual+system]",
     "llava15_7b_dopcd23", "llava15_7b_dopcd23[groups=visual+system]"),
    ("TextVQA", "GQA", "SEED"),
    "Eq. 14: d_A^s, d_P^s searched together with (d_A, d_P, n_v); the resulting policies are not printed. "
    "`vlmeval-dop search --system-tokens` profiles the system-token curves and solves Eq. 14.",
    budgets=(0.28, 0.23),
))
_DEPTH_NOTE = (
    "Layers are 1-based as in the paper (l1 = first decoder layer). A layer set that is not a suffix is not a "
    "DOPPolicy (d_A, d_P, n_v): each cell runs the entry `{model}__mha<l>` / `__mlp<a-b>` (an OperationMask "
    "in the executor: visual tokens skip exactly those operations), e.g. `python run.py --model "
    "llava15_7b__mha4-6 --data TextVQA`; `reproduce/run.py --table N` plans and runs them."
)
_add(TableSpec(
    26, "Pruning a single visual MHA/MLP operation at layer l (LLaVA-1.5-7B)", "depth_redundancy",
    ("llava15_7b",),
    tuple(f"llava15_7b[prune={m};eval={b}]" for m in ("MHA", "MLP") for b in ("TextVQA", "SEED")),
    ("l1", "l4", "l8", "l12", "l16", "l20", "l24", "l28", "l32"),
    _DEPTH_NOTE + " All 576 visual tokens are kept.",
))
_add(TableSpec(
    27, "Pruning 3 consecutive visual MHA/MLP operations (LLaVA-1.5-7B)", "depth_redundancy", ("llava15_7b",),
    tuple(f"llava15_7b[prune={m};eval={b}]" for m in ("MHA", "MLP") for b in ("TextVQA", "SEED")),
    ("l1-3", "l4-6", "l8-10", "l12-14", "l16-18", "l20-22", "l24-26", "l28-30"),
    _DEPTH_NOTE + " Column lA-B prunes layers A..B.",
))
_add(TableSpec(
    28, "MME after pruning 3 consecutive visual MHA/MLP operations (Qwen2.5-VL-7B)", "depth_redundancy",
    ("qwen25vl_7b",),
    ("qwen25vl_7b[prune=MHA;eval=MME]", "qwen25vl_7b[prune=MLP;eval=MME]"),
    ("l1-3", "l4-6", "l8-10", "l12-14", "l16-18", "l20-22", "l24-26"),
    _DEPTH_NOTE + " MME here is perception + reasoning (full model: 2286, Table 12).",
    units={c: "MME perception + reasoning (0-2800)" for c in
           ("l1-3", "l4-6", "l8-10", "l12-14", "l16-18", "l20-22", "l24-26")},
))
_add(TableSpec(
    29, "Policy perturbation on LLaVA-1.5-7B at 28% (10 random swaps each)", "perturbation", ("llava15_7b",),
    ("llava15_7b_dopcd28",) + tuple(f"llava15_7b_dopcd28[swap={k}{m};stat={s}]"
                                    for m in ("MHA", "MLP") for k in (1, 3) for s in ("best", "mean")),
    ("TextVQA", "GQA", "SEED"),
    "Swapping k kept and k pruned operations of one module type breaks the depth-wise constraint: each draw "
    "is the entry `{entry}__swap{k}{mha|mlp}.s{seed}` (vlmeval_dop/perturbation.py; seeds 0-9, the paper's "
    "10 repetitions); `reproduce/aggregate.py` reports best and mean per benchmark over the draws. The "
    "paper's draws are not published, so only the statistics are comparable. The original row equals Table "
    "8's DOP_CD 28% row.",
    budgets=(0.28,),
))
_add(TableSpec(
    30, "Policy perturbation on Qwen2.5-VL-7B at 26% (10 random swaps each)", "perturbation", ("qwen25vl_7b",),
    ("qwen25vl_7b_dopr26",) + tuple(f"qwen25vl_7b_dopr26[swap={k}MLP;stat={s}]" for k in (1, 3)
                                    for s in ("best", "mean")),
    ("TextVQA", "ChartQA", "MME"),
    "Only MLP swaps: the policy keeps every MHA operation (d_A = L = 28). Draws as in Table 29. The "
    "original row equals Table 12's DOP_R 26% row; MME is perception + reasoning.",
    budgets=(0.26,), units=_QI_UNITS,
))

assert sorted(TABLES) == list(range(1, 31))


def rel_avg_benchmarks(n: int, row: str) -> tuple[str, ...]:
    """The benchmarks the paper's Rel. Avg. of `row` in table `n` averages over.

    The table's own benchmark columns where it has them; otherwise (Tables 5 and 21 print only the
    aggregate) the benchmark set of that model's accuracy table: Tables 8-11 for LLaVA, 12-13 for
    Qwen2.5-VL / InternVL3.
    """
    spec = get_table(n)
    if not spec.has_rel_avg:
        raise ValueError(f"table {n} prints no Rel. Avg.")
    if spec.benchmarks:
        return spec.benchmarks
    return LLAVA_BENCHMARKS if parse_row(row).model.startswith("llava") else QI_BENCHMARKS


def get_table(n: int) -> TableSpec:
    """The spec of table `n`; a clear ValueError naming the valid numbers for anything else."""
    if isinstance(n, bool) or not isinstance(n, int) or n not in TABLES:
        raise ValueError(f"unknown table {n!r}; the paper's tables are numbered {min(TABLES)}-{max(TABLES)}")
    return TABLES[n]


# ------------------------------------------------------------------------------------------ row names
@dataclass(frozen=True)
class RowRef:
    """A parsed row name: the entry, its parts, and the bracketed configuration."""

    entry: str
    model: str
    method: str  # "full" for the bare model
    budget: float | None
    config: dict[str, str]


_ROW_RE = re.compile(r"^(?P<entry>[a-z0-9_]+)(?:\[(?P<cfg>[^\]]+)\])?$")


def parse_row(row: str) -> RowRef:
    """Split `entry[key=value;...]` into its parts; ValueError for names outside the conventions."""
    m = _ROW_RE.match(row)
    if not m:
        raise ValueError(f"row name {row!r} is not of the form entry or entry[key=value;...]")
    entry, cfg = m.group("entry"), m.group("cfg")
    config: dict[str, str] = {}
    for item in cfg.split(";") if cfg else ():
        key, sep, value = item.partition("=")
        if not sep or not value or key not in CONFIG_KEYS:
            raise ValueError(f"row {row!r}: bad configuration item {item!r}; keys: {', '.join(CONFIG_KEYS)}")
        config[key] = value
    # the entry naming rule, imported here: importing the vlmeval_dop package loads torch, which the
    # table registry's importers (aggregate.py) do not need
    from vlmeval_dop.entries.names import split_method_budget

    for model in sorted(MODELS + VIDEO_MODELS + tuple(EXTERNAL_MODELS), key=len, reverse=True):
        if entry == model:
            return RowRef(entry, model, "full", None, config)
        if entry.startswith(model + "_"):
            mm = split_method_budget(entry[len(model) + 1:])  # the entry naming rule (vlmeval_dop/entries/names.py)
            if mm and mm[1] is not None and mm[0] in METHODS:
                return RowRef(entry, model, mm[0], mm[1], config)
    raise ValueError(f"row {row!r}: {entry!r} is not {{model}} or {{model}}_{{method}}{{budget %}} with model in "
                     f"{', '.join(MODELS + VIDEO_MODELS)} and method in {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------- errata
@dataclass(frozen=True)
class Erratum:
    """One inconsistency of the paper (reproduce/PAPER_ERRATA.md describes each by its id).

    severity: "error" (provably wrong), "minor" (a printed Rel. Avg. that the printed cells do not give but
    unrounded scores could), "suspicious" (implausible, not provable), "editorial" (labels, references).
    A cell erratum has table/row/column; `corrected` is set only where the right value is certain.
    """

    id: str
    table: int | None
    row: str | None
    column: str | None
    printed: str | None
    corrected: str | None
    severity: str
    summary: str


ERRATA: tuple[Erratum, ...] = (
    Erratum("E01", 15, "llavanext_13b_dopcd23", "d_A", "340", "34", "error",
            "d_A cannot exceed L = 40; 34 fits the 23% budget."),
    Erratum("E02", 6, "internvl3_8b", "N_v", "1008", "1280", "error",
            "App. D.1, Table 13 and Table 16 give 1280 (896x896, 5 tiles x 256); 1008 is Qwen's input side."),
    Erratum("E03", 11, None, None, "576 Visual Tokens", "2880 Visual Tokens", "error",
            "Upper-bound header of LLaVA-NeXT-13B says 576 visual tokens."),
    Erratum("E04", 10, "llavanext_7b_dopcd9", "rel_avg", "97.2", None, "error",
            "Printed cells give 97.32 (97.3); repeated in Table 2. Either Rel. Avg. or one cell is off."),
    Erratum("E05", 2, "llavanext_7b_dopcd9", "rel_avg", "97.2", None, "error",
            "Same row as E04 (Table 2 repeats Table 10's row)."),
    Erratum("E06", 10, "llavanext_7b_vispruner23", "rel_avg", "99.0", None, "minor",
            "Printed cells give 99.07 (99.1)."),
    Erratum("E07", 12, "qwen25vl_7b_cdpruner43", "rel_avg", "98.5", None, "minor",
            "Printed cells give 98.55 (98.6)."),
    Erratum("E08", 12, "qwen25vl_7b_resize43", "rel_avg", "99.1", None, "minor",
            "Printed cells give 99.18 (99.2)."),
    Erratum("E09", 12, "qwen25vl_7b_resize26", "rel_avg", "96.7", None, "minor",
            "Printed cells give 96.75 (96.8)."),
    Erratum("E10", 12, "qwen25vl_7b_resize16", "rel_avg", "89.7", None, "minor",
            "Printed cells give 89.76 (89.8)."),
    Erratum("E11", 19, "qwen25vl_7b_cdpruner16", "rel_avg", "86.1", "86.2", "error",
            "Same cells as Table 12's CDPruner 16% row, which prints 86.2; the cells give 86.18."),
    Erratum("E12", 17, None, "label", "DOP_C", "DOP_CD", "editorial",
            "The captioning DOP rows use CDPruner (App. E.6): DOP_CD."),
    Erratum("E13", 24, None, "label", "DOP_R", "DOP_CD", "editorial",
            "LLaVA-1.5-7B with CDPruner (cells = Table 8's DOP_CD rows); DOP_R is the resizing variant."),
    Erratum("E14", 22, None, None, None, None, "error",
            "Grid said to be d in {1,3,5,...} but every printed grid policy has even depths; the 'w/ Additive' "
            "policies and scores differ from Table 15 / Table 8 without explanation."),
    Erratum("E15", 6, None, None, "MHA depth d_P", "MLP depth d_P", "editorial", "Caption typo."),
    Erratum("E16", None, None, None, "Table 21", "Table 14", "editorial",
            "Section 4.2 points to Table 21 for the other models' costs; they are in Table 14."),
    Erratum("E17", None, None, None, "100 TextVQA validation samples", None, "suspicious",
            "App. F.5 optimizes the accuracy objective on TextVQA validation samples, the evaluation split; "
            "everywhere else DOP is searched on training samples."),
    Erratum("E18", 26, "llava15_7b[prune=MHA;eval=SEED]", "l1", "26.1", None, "suspicious",
            "Pruning MHA at layer 1 alone scores 26.1 (chance level) while pruning layers 1-3 (Table 27) "
            "scores 60.4."),
    Erratum("E19", 8, "llava15_7b_dart23", None, "DART at 23 % TFLOPs", None, "suspicious",
            "DART prunes after layer 2 (K=2); two layers with all 576 visual tokens already exceed the TFLOPs of "
            "32 tokens in every layer, so the copied cell cannot be TFLOPs-matched with K=2 (also Table 10, "
            "llavanext_7b_dart9, and the 13B cells). Our entries prune after layer 0 (K=1) there."),
    Erratum("E20", 8, "llava15_7b_pdrop28", None, "PDrop at 37 / 28 % TFLOPs", None, "suspicious",
            "The official PDrop schedule (stages [8, 16, 24]) cannot reach 37 % or 28 % on LLaVA-1.5 (8 layers at "
            "576 tokens alone exceed them); the paper does not say which schedule its copied cells used. Ours adds "
            "a stage after layer 1 and solves only lambda (official int(N lambda^s) counts, renumbered positions)."),
)

# Rows whose printed Rel. Avg. does not recompute (to the printed digit) from the printed cells.
REL_AVG_EXCEPTIONS: frozenset[tuple[int, str]] = frozenset(
    (e.table, e.row) for e in ERRATA if e.column == "rel_avg" and e.table is not None and e.row is not None
)


# ------------------------------------------------------------------------------------------ CSV access
def read_paper_table(n: int, *, as_text: bool = False, corrected: bool = False) -> "pd.DataFrame":
    """The transcribed numbers of table `n` as a DataFrame (columns = `TABLES[n].header`).

    Args:
        as_text: keep every cell as the printed string (to know the printed precision); otherwise numeric
            columns are parsed as floats and empty cells are NaN.
        corrected: replace the cells whose erratum has a certain correction (`Erratum.corrected`).
    """
    import pandas as pd

    spec = get_table(n)
    df = pd.read_csv(spec.path, dtype=str, keep_default_na=False)
    if corrected:
        for e in ERRATA:
            if e.table == n and e.row is not None and e.column in df.columns and e.corrected is not None:
                df.loc[df["row"] == e.row, e.column] = e.corrected
    if as_text:
        return df
    for col in df.columns:
        if col in ("row", "label", "budget") or col.endswith("_samples"):
            continue
        df[col] = pd.to_numeric(df[col].mask(df[col] == ""), errors="raise")  # "" -> NaN
    if "budget" in df.columns:
        df["budget"] = pd.to_numeric(df["budget"].mask(df["budget"] == ""))
    return df
