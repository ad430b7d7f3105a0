"""Accuracy-drop curves for Eq. 13 (paper Appendix F.5), measured end to end.

Where profile.py measures the KL divergence of the first generated token, Eq. 13 replaces it with the task
metric: ``D_acc(policy) = Accuracy(L, L, N_v) - Accuracy(policy)``. For each validation sample this module
generates the answer greedily under the unpruned model and under each of the 3I curve policies
(`profile.curve_policies`), scores every answer against the sample's ground truth with VLMEvalKit's own
per-sample metric (`sample_scorer`), and records the per-sample drops. Whole answers are generated, so no
prefix sharing applies: this costs 3I+1 full generations per sample.

Results are written per sample to ``<out_dir>/acc_samples.rank<r>.jsonl`` as they finish (resumable,
sharded like `profile.ProfileRun`); `build_accuracy_profile` merges them into a `DivergenceProfile` with
``objective="acc_drop"``, the input of `extensions.optimize_accuracy`.
"""
from __future__ import annotations

import copy
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..executor import apply_dop
from .divergence import accuracy_drop
from .profile import CURVES, RankFiles, build_profile, curve_policies

SAMPLES_PATTERN = "acc_samples.rank*.jsonl"
_LETTERS = frozenset(string.ascii_uppercase)  # option columns (VLMEvalKit lower-cases every other column)

Scorer = Callable[[pd.Series, str], float]

SUPPORTED_TYPES = (
    "VQA (ImageVQADataset and its subclasses that keep its evaluate, VizWiz, CustomVQADataset, "
    "and the plugin VQAv2_VAL / DOP_Demo), MCQ (ImageMCQDataset and its subclasses that keep its evaluate), "
    "Y/N (ImageYORNDataset)"
)

# ImageVQADataset.evaluate_heuristic picks its metric by dataset name (first match wins, else vqa_score)
_VQA_METHODS = (
    (("TextVQA",), "vqa_score"),
    (("ChartQA",), "relaxed_accuracy"),
    (("OCRVQA", "GQA"), "accuracy"),
    (("DocVQA", "InfoVQA"), "anls"),
)


# --------------------------------------------------------------------------------------------- scoring
def sample_scorer(dataset) -> Scorer:
    """Per-sample score in [0, 1] of a prediction, with the metric VLMEvalKit's evaluation of `dataset` uses.

    `dataset` is a built VLMEvalKit dataset (`vlmeval.dataset.build_dataset`); the returned callable takes
    one row of `dataset.data` and the model's answer. No LLM judge is used (VLMEvalKit's ``exact_matching``):

    - **VQA** (`ImageVQADataset`, `CustomVQADataset`): `vqa_eval.process_line` with the method
      `ImageVQADataset.evaluate_heuristic` picks by name (TextVQA ``vqa_score``, ChartQA ``relaxed_accuracy``,
      OCRVQA/GQA ``accuracy``, DocVQA/InfoVQA ``anls``, else ``vqa_score``), reduced by `hit_calculate`
      (the value averaged into the reported "Overall"). A custom TSV (e.g. a TextVQA training split) has no
      metric in VLMEvalKit; it gets the same name rules. `VizWiz`: the same on its ``answers`` column.
    - **MCQ** (`ImageMCQDataset`): `multiple_choice.eval_vanilla` with no judge, i.e. `can_infer` option
      extraction compared to ``answer`` (MMMU rows first get `MMMU_preproc`). Circular datasets (MMBench)
      score each row on its own; VLMEvalKit's all-rotations-correct rule is a dataset-level aggregate.
    - **Y/N** (`ImageYORNDataset`): `yorn.YOrN_Extraction` compared to ``answer`` (case-insensitive for AMBER,
      as VLMEvalKit does).
    - plugin datasets (vlmeval_dop.datasets): ``VQAv2_VAL`` `vqa_accuracy`, ``DOP_Demo`` exact match.

    Raises:
        ValueError: any other dataset type or class (its metric is not a per-sample rule listed above).
    """
    from vlmeval.dataset.image_mcq import ImageMCQDataset
    from vlmeval.dataset.image_vqa import CustomVQADataset, ImageVQADataset, VizWiz
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    from ..datasets import DOPDemoDataset, VQAv2Dataset

    name = str(dataset.dataset_name)
    cls = type(dataset)
    kind = getattr(dataset, "TYPE", None)
    if isinstance(dataset, VQAv2Dataset):
        return _vqav2_scorer(name)
    if isinstance(dataset, DOPDemoDataset):
        return _exact_scorer()
    # a subclass that overrides evaluate has its own metric: refuse rather than score it wrongly
    if isinstance(dataset, ImageVQADataset) and cls.evaluate is ImageVQADataset.evaluate:
        return _vqa_scorer(name, "answer")
    if isinstance(dataset, CustomVQADataset):
        return _vqa_scorer(name, "answer")
    if isinstance(dataset, VizWiz):
        return _vqa_scorer(name, "answers")
    if isinstance(dataset, ImageMCQDataset) and cls.evaluate is ImageMCQDataset.evaluate:
        return _mcq_scorer(name)
    if isinstance(dataset, ImageYORNDataset) and cls.evaluate is ImageYORNDataset.evaluate:
        return _yorn_scorer(name)
    raise ValueError(
        f"no per-sample accuracy for dataset {name!r} ({cls.__name__}, type {kind!r}); supported: {SUPPORTED_TYPES}"
    )


def _vqa_scorer(name: str, answer_column: str) -> Scorer:
    from vlmeval.dataset.utils.vqa_eval import hit_calculate, process_line
    from vlmeval.smp import istype, listinstr

    method = next((m for keys, m in _VQA_METHODS if listinstr(list(keys), name)), "vqa_score")

    def score(row: pd.Series, prediction: str) -> float:
        answer = str(row[answer_column])  # VLMEvalKit stringifies the cell before process_line
        if method == "vqa_score" and not istype(answer, list):
            # leave-one-out over a single answer always gives 0: a profile of zeros, not an error message
            raise ValueError(f"{name}: vqa_score needs a list of reference answers, got {answer!r}")
        res = process_line({"answer": answer, "prediction": str(prediction)}, method=method)
        return float(hit_calculate([res], name)[0])

    return score


def _mcq_scorer(name: str) -> Scorer:
    from vlmeval.dataset.utils import multiple_choice as mc

    def score(row: pd.Series, prediction: str) -> float:
        # the per-row part of ImageMCQDataset.evaluate_heuristic / mcq_vanilla_eval
        item = {k.lower() if isinstance(k, str) and k not in _LETTERS else k: v for k, v in row.items()}
        item["prediction"] = str(prediction)
        answer = item["answer"]
        if "MMMU" in name:
            logger_was = mc.logger.disabled
            mc.logger.disabled = True  # MMMU_preproc logs a line per call
            try:
                item = mc.MMMU_preproc(pd.DataFrame([item])).iloc[0].to_dict()
            finally:
                mc.logger.disabled = logger_was
            answer = answer if answer in _LETTERS else "A"
        item["GT"] = answer
        return float(mc.eval_vanilla(None, pd.Series(item), dataset_name=name)["hit"])

    return score


def _yorn_scorer(name: str) -> Scorer:
    from vlmeval.dataset.utils.yorn import YOrN_Extraction
    from vlmeval.smp import listinstr

    fold = listinstr(["AMBER"], name)

    def score(row: pd.Series, prediction: str) -> float:
        extracted, answer = YOrN_Extraction(str(prediction)), str(row["answer"])
        if fold:
            extracted, answer = extracted.lower(), answer.lower()
        return float(extracted == answer)

    return score


def _vqav2_scorer(name: str) -> Scorer:
    from ..datasets import _answers, vqa_accuracy

    if name != "VQAv2_VAL":
        raise ValueError(f"{name} has no public answers; use VQAv2_VAL")
    return lambda row, prediction: vqa_accuracy(prediction, _answers(row["answer"]))


def _exact_scorer() -> Scorer:
    from ..datasets import normalize_exact

    return lambda row, prediction: float(normalize_exact(prediction) == normalize_exact(row["answer"]))


# ------------------------------------------------------------------------------------------ generation
def generate_answers(model, processor_decode, inputs: dict[str, Any], max_new_tokens: int,
                     generation_config=None) -> list[str]:
    """Greedy answers of the model as it is now (wrap in `apply_dop` to prune): new tokens only, stripped."""
    if generation_config is None:
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    else:  # transformers deprecates a config together with loose generation kwargs
        config = copy.deepcopy(generation_config)
        config.update(max_new_tokens=max_new_tokens, do_sample=False)
        kwargs = {"generation_config": config}
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    # left padding: every sample's new tokens start at the padded prompt length
    return [str(s).strip() for s in processor_decode(out[:, inputs["input_ids"].shape[1]:])]


@dataclass
class AccuracyBatch:
    """What `profile_accuracy_batch` measured for one batch of B samples.

    Attributes:
        drops: {"D_A": (B, len(depths)), "D_P": (B, len(depths)), "D_v": (B, len(visual))} float64,
            score(full) - score(policy) per sample and point.
        full_scores: (B,) float64 scores of the unpruned answers.
        answers: {"full": [B answers], curve: [B lists, one answer per point]}.
    """

    drops: dict[str, torch.Tensor]
    full_scores: torch.Tensor
    answers: dict[str, list]


def profile_accuracy_batch(
    model,
    processor_decode: Callable[[torch.Tensor], list[str]],
    inputs: dict[str, Any],
    rows: Sequence[pd.Series] | pd.DataFrame,
    scorer: Scorer,
    depths: Sequence[int],
    visual: Sequence[int],
    reducer: str | None,
    max_new_tokens: int,
    *,
    generation_config=None,
    resized: dict[int, dict[str, Any]] | None = None,
) -> AccuracyBatch:
    """Per-sample accuracy drops of one batch at every sampling point (Eq. 13's curves).

    Generates greedily with the unpruned model and under each curve policy (`apply_dop`, the reducer only
    for the `D_v` points), decodes the new tokens with `processor_decode` (ids -> list of str, e.g.
    ``lambda ids: processor.batch_decode(ids, skip_special_tokens=True)``) and scores each answer against its
    row with `scorer` (`sample_scorer`). `generation_config` (e.g. the wrapper's `generation_config()`) makes
    the answers those evaluation produces when the checkpoint's defaults differ (repetition penalty, pad id).
    With the image-side `resize` reducer (DOP_R), the `D_v` point `n` answers on `resized[n]` (the samples'
    inputs with images resized for about `n` visual tokens) with the stock model.
    """
    from .profile import IMAGE_SIDE_REDUCERS

    from ..arch import ArchSpec

    B = int(inputs["input_ids"].shape[0])
    if isinstance(rows, pd.DataFrame):
        rows = [row for _, row in rows.iterrows()]
    if len(rows) != B:
        raise ValueError(f"{len(rows)} rows for a batch of {B} samples")

    image_side = reducer in IMAGE_SIDE_REDUCERS
    if image_side and (resized is None or any(n not in resized for n in visual)):
        raise ValueError(f"reducer {reducer!r} reduces the image: give the inputs resized for every n_v in {list(visual)}")

    def answer_and_score(x=inputs) -> tuple[list[str], torch.Tensor]:
        answers = generate_answers(model, processor_decode, x, max_new_tokens, generation_config)
        return answers, torch.tensor([float(scorer(r, a)) for r, a in zip(rows, answers)], dtype=torch.float64)

    full_answers, full_scores = answer_and_score()
    drops: dict[str, torch.Tensor] = {}
    answers: dict[str, list] = {"full": full_answers}
    L = ArchSpec.from_model(model).num_layers
    for curve, policies in curve_policies(L, depths, visual).items():
        per_point, texts = [], []
        for policy in policies:
            if image_side and policy.n_v is not None:
                pruned_answers, pruned_scores = answer_and_score(resized[policy.n_v])
            else:
                with apply_dop(model, policy, reducer=reducer if policy.n_v is not None else None):
                    pruned_answers, pruned_scores = answer_and_score()
            per_point.append(accuracy_drop(full_scores, pruned_scores).per_sample)
            texts.append(pruned_answers)
        drops[curve] = torch.stack(per_point, dim=1)
        answers[curve] = [list(t) for t in zip(*texts)]  # per sample: one answer per point
    return AccuracyBatch(drops, full_scores, answers)


# ------------------------------------------------------------------------------------------ the job
@dataclass
class AccuracyProfileRun(RankFiles):
    """A resumable accuracy-drop profiling job writing per-sample results under `out_dir` (cf. ProfileRun).

    Attributes:
        out_dir: one directory per (model, reducer, dataset, samples, seed); kept apart from a KL profile's
            files by the ``acc_`` prefix.
        depths, visual, reducer: the sampling points and the `D_v` reducer.
        max_new_tokens: generation length of every answer.
        rank, world_size: this process's shard (each rank profiles samples i % world == rank).
        generation_config: passed to `profile_accuracy_batch`.
    """

    out_dir: Path
    depths: list[int]
    visual: list[int]
    reducer: str | None
    max_new_tokens: int
    rank: int = 0
    world_size: int = 1
    generation_config: Any = None
    sample_keys: Mapping[str, str] | None = None  # as ProfileRun's (model, weights, row, inputs)
    FILE_PREFIX = "acc_samples"

    def run(
        self,
        model,
        processor_decode: Callable[[torch.Tensor], list[str]],
        scorer: Scorer,
        batches: Iterable[tuple[list[str], dict[str, Any], Sequence[pd.Series]]],
        total: int | None = None,
    ) -> int:
        """Profile every batch `(sample_ids, inputs, rows)` not yet done; returns the samples added.
        With an image-side reducer a batch is `(sample_ids, inputs, rows, {n_v: resized inputs})`.

        Each record holds the sample's full score, its drops per curve and every generated answer.
        """
        done = self.resume()
        added = 0
        for ids, inputs, rows, *resized in tqdm(batches, total=total, desc="accuracy profiling", unit="batch"):
            if all(i in done for i in ids):
                continue
            out = profile_accuracy_batch(
                model, processor_decode, inputs, rows, scorer, self.depths, self.visual, self.reducer,
                self.max_new_tokens, generation_config=self.generation_config,
                resized=resized[0] if resized else None,
            )
            for b, sid in enumerate(ids):
                if sid in done:
                    continue
                self.write_record({  # one whole line per finished sample: it survives an interruption
                    "id": sid,
                    "full": float(out.full_scores[b]),
                    **{c: [float(v) for v in out.drops[c][b].tolist()] for c in CURVES},
                    "answers": {k: v[b] for k, v in out.answers.items()},
                })
                added += 1
        return added

    def settings(self) -> Any:
        """What determines a record besides the sample: points, reducer, decoding, metric code."""
        import sys

        from . import divergence
        from .profile import code_version

        gen = None if self.generation_config is None else self.generation_config.to_dict()
        if isinstance(gen, dict):
            gen.pop("transformers_version", None)
        return {"objective": "acc_drop", "depths": list(self.depths), "visual": list(self.visual),
                "reducer": self.reducer, "max_new_tokens": self.max_new_tokens, "generation": gen,
                "code": code_version(divergence, sys.modules[__name__])}


def build_accuracy_profile(out_dir: Path, **kwargs):
    """Merge the per-sample drops under `out_dir` into a `DivergenceProfile` with ``objective="acc_drop"``
    (keyword arguments as `profile.build_profile`)."""
    return build_profile(out_dir, pattern=SAMPLES_PATTERN, objective="acc_drop", **kwargs)
