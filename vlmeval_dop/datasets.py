"""Datasets for VLMEvalKit: the paper's benchmark aliases, a VQAv2 plugin dataset and an offline demo set.

- **Aliases** (`eval_configs/entries.yaml`, `benchmarks:`): the paper's 13 short names map to VLMEvalKit
  dataset names (`TextVQA -> TextVQA_VAL`, `GQA -> GQA_TestDev_Balanced`, `MMB -> MMBench_DEV_EN`, ...).
  run.py rewrites `--data` with them before VLMEvalKit sees it, so VLMEvalKit's name-based logic (prompts,
  metrics, circular MMBench evaluation) and its result file names are exactly those of the real dataset.
- **VQAv2** (`VQAv2_TestDev`, `VQAv2_VAL`). VLMEvalKit has no VQAv2. The paper (Appendix D.2) evaluates
  on *test-dev*, whose answers are not public: the LLaVA numbers it reports come from the official
  LLaVA/VisPruner/CDPruner pipeline, which answers the test-dev questions with the LLaVA short-answer
  prompt and submits the answers to the EvalAI VQA server, scoring the standard VQA accuracy. Here
  `VQAv2_TestDev` runs inference and writes that submission file (`*_submission.json`); `VQAv2_VAL`
  (val2014, answers public) is scored locally with the standard VQA accuracy: for a prediction and the
  10 human answers, acc = mean over the 10 leave-one-out subsets of min(1, #matches / 3), after the VQA
  answer normalisation (punctuation, digits, articles, contractions; VLMEvalKit's `process_answer`).
  Build either TSV from the official files with `python -m vlmeval_dop.datasets prepare-vqav2 ...`.
- **TextVQA_TRAIN**: the TextVQA train questions (the paper's search validation data) with TextVQA_VAL's
  prompt and metric; `python -m vlmeval_dop.datasets prepare-textvqa-train ...` builds it.
- **DOP_Demo**: 8 generated images (coloured shapes) with questions whose exact answers are known
  (colour, count, shape), built deterministically in memory, scored by exact match; no download, no judge.
- **Video QA** (`TGIF_QA`, `MSVD_QA`, `MSRVTT_QA`, their `_VAL` search sets, and the offline `DOP_VideoDemo`):
  VLMEvalKit video datasets of vlmeval_dop/video_qa.py (Table 18; GPT judge through VLMEvalKit's build_judge);
  `python -m vlmeval_dop.datasets prepare-video-qa ...` builds them from the official files.

`register_datasets()` adds the plugin classes to VLMEvalKit's dataset registry
(`vlmeval.dataset.DATASET_CLASSES`, which `build_dataset`, `DATASET_TYPE` and the status reports iterate).
This module imports vlmeval.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os.path as osp
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from vlmeval.dataset.image_base import ImageBaseDataset
from vlmeval.dataset.image_vqa import ImageVQADataset
from vlmeval.smp import LMUDataRoot, d2df, dump, encode_image_to_base64, get_intermediate_file_path, load

from .models_config import CONFIG_DIR

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


# --------------------------------------------------------------------------------------------- aliases
@lru_cache(maxsize=None)
def benchmark_aliases(config_dir: Path | None = None) -> dict[str, str]:
    """The paper's short benchmark names -> VLMEvalKit dataset names (eval_configs/entries.yaml)."""
    from .fileio import read_yaml

    raw = read_yaml((config_dir or CONFIG_DIR) / "entries.yaml", "restore it (git checkout -- eval_configs/)") or {}
    return {str(k): str(v) for k, v in (raw.get("benchmarks") or {}).items()}


def known_datasets() -> list[str]:
    """Every dataset name run.py accepts: aliases, VLMEvalKit's image/video datasets and ours."""
    from vlmeval.dataset import SUPPORTED_DATASETS
    from vlmeval.dataset.video_dataset_config import supported_video_datasets

    register_datasets()
    names = list(benchmark_aliases()) + list(SUPPORTED_DATASETS) + list(supported_video_datasets)
    return list(dict.fromkeys(names))


class UnknownDatasetError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def resolve_dataset_name(name: str) -> str:
    """Alias -> VLMEvalKit name; VLMEvalKit names and custom `LMUData/<name>.tsv` files pass unchanged.

    Unknown names raise UnknownDatasetError naming the closest valid names.
    """
    aliases = benchmark_aliases()
    if name in aliases:
        return aliases[name]
    known = known_datasets()
    if name in known or osp.exists(osp.join(LMUDataRoot(), f"{name}.tsv")):  # VLMEvalKit's custom TSVs
        return name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    close += [n for n in known if name.lower() in n.lower() and n not in close][: 5 - len(close)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r}.{hint} Paper benchmarks: {', '.join(aliases)}; "
        f"offline demos: DOP_Demo, DOP_VideoDemo; any VLMEvalKit dataset name, or a custom {LMUDataRoot()}/<name>.tsv."
    )


# ---------------------------------------------------------------------------------------- validation
class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file, the row and the problem."""


def dataset_source(name: str, dataset=None) -> str:
    """Where a dataset's rows come from, for messages: its TSV file, else its name."""
    path = getattr(dataset, "data_path", None) or osp.join(LMUDataRoot(), f"{name}.tsv")
    return str(path) if osp.exists(str(path)) else name


def _check_tsv_file(path: str) -> None:
    """A custom TSV read before VLMEvalKit does, so that its problems are named (cheap: header + 1 row)."""
    if osp.getsize(path) == 0:
        raise DatasetError(f"{path} is empty; a dataset TSV needs a header (index, question, image or image_path) "
                           "and rows")
    try:
        head = pd.read_csv(path, sep="\t", nrows=1)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable TSV ({exc})") from None
    _check_columns(path, head.columns)
    if len(head) == 0:
        raise DatasetError(f"{path} has a header but no rows")


def _check_columns(where: str, columns) -> None:
    cols = {str(c) for c in columns}
    missing = [c for c in ("index", "question") if c not in cols]
    if not cols & {"image", "image_path"}:
        missing.append("image or image_path")
    if missing:
        raise DatasetError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(sorted(cols))})")


def load_checked_dataset(name: str):
    """VLMEvalKit's dataset `name`, checked before any model work: the file exists and is readable, the
    columns index / question / image or image_path exist, there are rows, and indices are unique (a
    duplicate index would make two rows one sample). Raises DatasetError naming the file and the problem."""
    from vlmeval.dataset import build_dataset

    register_datasets()
    resolved = resolve_dataset_name(name)
    path = osp.join(LMUDataRoot(), f"{resolved}.tsv")
    if osp.isfile(path) and resolved != "DOP_Demo":  # DOP_Demo is built in memory, not read from a file
        _check_tsv_file(path)
    try:
        dataset = build_dataset(resolved)
    except DatasetError:
        raise
    except Exception as exc:  # VLMEvalKit's own loading: name the file and the problem
        raise DatasetError(f"{dataset_source(resolved)}: VLMEvalKit could not load dataset {resolved!r} "
                           f"({type(exc).__name__}: {exc}); check that the file is complete and has the columns "
                           "index, question and image or image_path") from None
    if dataset is None:
        raise DatasetError(f"dataset {resolved!r} could not be built by VLMEvalKit (name or $LMUData/{resolved}.tsv)")
    where = dataset_source(resolved, dataset)
    data = dataset.data
    if len(data) == 0:
        raise DatasetError(f"{where}: no rows with an image")
    _check_columns(where, data.columns)
    counts = data["index"].astype(str).value_counts()
    dup = counts[counts > 1]
    if len(dup):
        idx = dup.index[0]
        rows = [str(_row_number(data, label)) for label in data.index[data["index"].astype(str) == idx]]
        raise DatasetError(f"{where}: index {idx} appears {int(dup.iloc[0])} times (rows {', '.join(rows)})"
                           f"{f' and {len(dup) - 1} other indices repeat' if len(dup) > 1 else ''}; "
                           "every row needs its own index")
    return dataset


def _row_number(data: pd.DataFrame, label) -> int | str:
    # rows read from a TSV keep their 0-based file row as label (also after VLMEvalKit drops image-less rows)
    if isinstance(label, (int, np.integer)):
        return int(label) + 1
    pos = data.index.get_loc(label)
    return pos + 1 if isinstance(pos, int) else "?"


def row_label(dataset, row) -> str:
    """`<file> row <n> (index <i>)` of a row of `dataset.data` (n counts the file's data rows from 1)."""
    return f"{dataset_source(dataset.dataset_name, dataset)} row {_row_number(dataset.data, row.name)} " \
           f"(index {row['index']})"


def checked_messages(dataset, rows: pd.DataFrame, message_of, single_image: bool = False) -> list:
    """The VLMEvalKit message of each row (`message_of(row)`), checked: a non-empty question, images that
    decode (size rule of vlmeval_dop/images.py), and with `single_image` exactly one image per prompt.
    Raises DatasetError naming the file, the row and the problem."""
    import binascii

    from .images import ImageError, open_image

    out = []
    for _, row in rows.iterrows():
        label = row_label(dataset, row)
        question = row.get("question")
        if question is None or (isinstance(question, float) and np.isnan(question)) or not str(question).strip():
            raise DatasetError(f"{label}: empty question")
        try:
            message = message_of(row)
        except (binascii.Error, OSError) as exc:  # bad base64, not an image, truncated file
            raise DatasetError(f"{label}: the image does not decode ({type(exc).__name__}: {exc}); the file may be "
                               "truncated, or the cell is not base64 of an image") from None
        except AssertionError as exc:  # VLMEvalKit's dump_image: an image_path that does not exist
            raise DatasetError(f"{label}: the image cannot be found ({exc})") from None
        images = [m["value"] for m in message if m["type"] == "image"]
        if single_image and len(images) != 1:
            raise DatasetError(
                f"{label}: the prompt has {len(images)} images; the search profiles single-image prompts (n_v "
                "counts one image's visual tokens): use single-image rows")
        for path in images:
            try:
                open_image(path)
            except ImageError as exc:
                raise DatasetError(f"{label}: {exc}") from None
        out.append(message)
    return out


# ------------------------------------------------------------------------------------------ VQA metric
def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Standard VQA accuracy of one prediction against the human answers (10 for VQAv2).

    acc = mean over i of min(1, #{j != i : answers[j] == prediction} / 3), after VQA normalisation of the
    prediction and the answers (VLMEvalKit's `process_answer`, the official VQA eval's processing).
    """
    from vlmeval.dataset.utils.vqa_eval import process_answer

    pred = process_answer(str(prediction))
    gts = [process_answer(str(a)) for a in answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(gts) == 1:
        return float(gts[0] == pred)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3.0) for i in range(len(gts))]
    return float(np.mean(accs))


def _answers(cell) -> list[str]:
    """The answer list stored in a TSV cell (a JSON/Python list literal or a single answer)."""
    if isinstance(cell, list):
        return [str(a) for a in cell]
    text = str(cell)
    if text.startswith("["):
        try:
            return [str(a) for a in json.loads(text)]
        except json.JSONDecodeError:
            import ast

            return [str(a) for a in ast.literal_eval(text)]
    return [text]


class VQAv2Dataset(ImageBaseDataset):
    """VQAv2 as a VLMEvalKit dataset: `VQAv2_VAL` (scored here) and `VQAv2_TestDev` (EvalAI submission).

    Data: `LMUData/<name>.tsv` with columns index (the VQA question_id), image_path, question, and for
    VAL answer (list of the 10 human answers) and answer_type; built by `prepare_vqav2`. Prompt: the
    question + "Answer the question using a single word or phrase." (LLaVA's VQAv2 prompt; wrappers with
    custom VQA prompts apply theirs, as for any VLMEvalKit VQA dataset).
    """

    TYPE = "VQA"
    DATASET_URL = {"VQAv2_VAL": "", "VQAv2_TestDev": ""}  # no public TSV: built locally (prepare_vqav2)
    DATASET_MD5 = {}

    def load_data(self, dataset):
        path = osp.join(LMUDataRoot(), f"{dataset}.tsv")
        if not osp.exists(path):
            split = "val" if dataset == "VQAv2_VAL" else "test-dev"
            raise FileNotFoundError(
                f"{path} not found. {dataset} is built from the official VQAv2 files ({split}): "
                f"python -m vlmeval_dop.datasets prepare-vqav2 --split {split} --questions <questions json> "
                + ("--annotations <annotations json> " if split == "val" else "")
                + "--images <COCO image dir>"
            )
        self.data_path = path
        return load(path)

    def build_prompt(self, line):
        msgs = super().build_prompt(line)
        msgs[-1]["value"] += SHORT_ANSWER_PROMPT
        return msgs

    def evaluate(self, eval_file, **judge_kwargs):
        data = load(eval_file)
        if self.dataset_name == "VQAv2_TestDev":
            out = get_intermediate_file_path(eval_file, "_submission", "json")
            write_vqav2_submission(data, out)
            print(f"VQAv2 test-dev answers are not public: submit {out} to the EvalAI VQA challenge (test-dev phase).")
            return None
        data["score"] = [vqa_accuracy(p, _answers(a)) for p, a in zip(data["prediction"], data["answer"])]
        dump(data, get_intermediate_file_path(eval_file, "_results"))
        ret = {"Overall": 100 * float(data["score"].mean())}
        if "answer_type" in data:
            for t in sorted(set(data["answer_type"])):
                ret[t] = 100 * float(data.loc[data["answer_type"] == t, "score"].mean())
        ret = d2df(ret)
        dump(ret, get_intermediate_file_path(eval_file, "_acc"))
        return ret


def write_vqav2_submission(predictions: pd.DataFrame, out_path: str, all_question_ids: list[int] | None = None) -> str:
    """EvalAI results file `[{"question_id", "answer"}]` (answers normalised as the VQA evaluation does).

    `all_question_ids`: pad the file with empty answers for these ids (LLaVA's submission script pads to
    every test2015 question, which the test-dev phase accepts).
    """
    from vlmeval.dataset.utils.vqa_eval import process_answer

    answers = {int(q): process_answer(str(p)) for q, p in zip(predictions["index"], predictions["prediction"])}
    for q in all_question_ids or []:
        answers.setdefault(int(q), "")
    with open(out_path, "w") as f:
        json.dump([{"question_id": q, "answer": a} for q, a in answers.items()], f)
    return out_path


def prepare_vqav2(split: str, questions: str, images: str, out: str | None = None, annotations: str | None = None) -> str:
    """Build `LMUData/VQAv2_VAL.tsv` or `VQAv2_TestDev.tsv` from the official VQAv2 json files.

    Args:
        split: `val` (v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json)
            or `test-dev` (v2_OpenEnded_mscoco_test-dev2015_questions.json; no annotations).
        questions, annotations: the official json files.
        images: the COCO image directory (val2014/ or test2015/); images are referenced by path.
    """
    if split not in ("val", "test-dev"):
        raise ValueError(f"split must be 'val' or 'test-dev', got {split!r}")
    if split == "val" and not annotations:
        raise ValueError("the val split needs --annotations (the answers)")
    qs = json.loads(Path(questions).read_text())["questions"]
    prefix = "COCO_val2014_" if split == "val" else "COCO_test2015_"
    rows = []
    for q in qs:
        rows.append({
            "index": q["question_id"],
            "image_path": osp.abspath(osp.join(images, f"{prefix}{q['image_id']:012d}.jpg")),
            "question": q["question"],
        })
    df = pd.DataFrame(rows)
    if annotations:
        ann = {a["question_id"]: a for a in json.loads(Path(annotations).read_text())["annotations"]}
        df["answer"] = [json.dumps([x["answer"] for x in ann[i]["answers"]]) for i in df["index"]]
        df["answer_type"] = [ann[i]["answer_type"] for i in df["index"]]
        df["question_type"] = [ann[i]["question_type"] for i in df["index"]]
    name = "VQAv2_VAL" if split == "val" else "VQAv2_TestDev"
    out = out or osp.join(LMUDataRoot(), f"{name}.tsv")
    df.to_csv(out, sep="\t", index=False)
    return out


# ------------------------------------------------------------------------------- TextVQA train split
class TextVQATrainDataset(ImageVQADataset):
    """TextVQA *train* (`TextVQA_TRAIN`): the paper's validation data for the policy search (100 samples,
    seed 42). VLMEvalKit ships TextVQA_VAL only; this is the same dataset class logic (prompt with the
    short-answer suffix, VQA score of the 10 answers, chosen by the "TextVQA" name) on the train questions.

    Data: `LMUData/TextVQA_TRAIN.tsv` (index = question_id, image_path, question, answer = the 10 answers),
    built by `prepare_textvqa_train` from the official TextVQA_0.5.1_train.json and train_images/.
    """

    DATASET_URL = {"TextVQA_TRAIN": ""}  # no public TSV: built locally (prepare_textvqa_train)
    DATASET_MD5 = {}

    def load_data(self, dataset):
        path = osp.join(LMUDataRoot(), f"{dataset}.tsv")
        if not osp.exists(path):
            raise FileNotFoundError(
                f"{path} not found. {dataset} is built from the official TextVQA files: python -m "
                "vlmeval_dop.datasets prepare-textvqa-train --questions TextVQA_0.5.1_train.json --images train_images/"
            )
        self.data_path = path
        return load(path)


def prepare_textvqa_train(questions: str, images: str, out: str | None = None) -> str:
    """Build `LMUData/TextVQA_TRAIN.tsv` from the official TextVQA_0.5.1_train.json and its image directory.

    Images are referenced by absolute path (`<images>/<image_id>.jpg`, checked to exist); the answer column
    holds the 10 human answers as a Python list literal, as VLMEvalKit's TextVQA_VAL.tsv does.
    """
    data = json.loads(Path(questions).read_text())["data"]
    rows = []
    for q in data:
        path = osp.abspath(osp.join(images, f"{q['image_id']}.jpg"))
        if not osp.exists(path):
            raise FileNotFoundError(f"image of question {q['question_id']} not found: {path}")
        rows.append({"index": q["question_id"], "image_path": path, "question": q["question"],
                     "answer": str([str(a) for a in q["answers"]])})
    out = out or osp.join(LMUDataRoot(), "TextVQA_TRAIN.tsv")
    tmp = f"{out}.tmp"
    pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    Path(tmp).replace(out)  # never a half-written TSV under the dataset's name
    return out


# ------------------------------------------------------------------------------------------ demo set
_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (224, 224), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def demo_samples() -> list[dict]:
    """The DOP_Demo samples: (image, question, answer, category), fully determined by this code."""
    out = []
    for colour in ("red", "green", "blue"):
        img, d = _canvas()
        d.rectangle((52, 52, 172, 172), fill=_COLOURS[colour])
        out.append((img, "What color is the square?", colour, "color"))
    for count, colour in ((2, "blue"), (3, "red"), (4, "green")):
        img, d = _canvas()
        for i in range(count):
            x, y = 20 + (i % 2) * 110, 20 + (i // 2) * 110
            d.ellipse((x, y, x + 80, y + 80), fill=_COLOURS[colour])
        out.append((img, "How many circles are there?", str(count), "count"))
    img, d = _canvas()
    d.polygon([(112, 30), (30, 194), (194, 194)], fill=_COLOURS["yellow"])
    out.append((img, "What shape is shown?", "triangle", "shape"))
    img, d = _canvas()
    d.ellipse((40, 40, 184, 184), fill=_COLOURS["blue"])
    out.append((img, "What shape is shown?", "circle", "shape"))
    return [
        {"index": i, "image": encode_image_to_base64(im, fmt="PNG"), "question": q, "answer": a, "category": c}
        for i, (im, q, a, c) in enumerate(out)
    ]


def normalize_exact(text) -> str:
    """Exact-match normalisation: case, surrounding whitespace and a trailing full stop are ignored."""
    return " ".join(str(text).strip().lower().rstrip(".").split())


class DOPDemoDataset(ImageBaseDataset):
    """`DOP_Demo`: 8 generated images with exactly known answers, scored by exact match (no judge).

    The class builds its data itself (`load_data`) instead of reading `LMUData/DOP_Demo.tsv`, so the demo
    needs neither a download nor a prepared file; VLMEvalKit still decodes the images into
    `LMUData/images/DOP_Demo/` as for every dataset.
    """

    TYPE = "VQA"
    DATASET_URL = {"DOP_Demo": ""}
    DATASET_MD5 = {}

    def load_data(self, dataset):
        return pd.DataFrame(demo_samples())

    def build_prompt(self, line):
        msgs = super().build_prompt(line)
        msgs[-1]["value"] += SHORT_ANSWER_PROMPT
        return msgs

    def evaluate(self, eval_file, **judge_kwargs):
        return evaluate_exact_match(eval_file)


def evaluate_exact_match(eval_file: str) -> pd.DataFrame:
    """The demo datasets' metric: exact match (`normalize_exact`) of prediction and answer; writes `_results`
    (per-sample `hit`) and `_acc` (Overall and per category, in percent) beside `eval_file`."""
    data = load(eval_file)
    preds = ["" if isinstance(p, float) and np.isnan(p) else p for p in data["prediction"]]
    data["hit"] = [int(normalize_exact(p) == normalize_exact(a)) for p, a in zip(preds, data["answer"])]
    dump(data, get_intermediate_file_path(eval_file, "_results"))
    ret = {"Overall": 100 * float(data["hit"].mean())}
    for c in sorted(set(data["category"])):
        ret[c] = 100 * float(data.loc[data["category"] == c, "hit"].mean())
    ret = d2df(ret)
    dump(ret, get_intermediate_file_path(eval_file, "_acc"))
    return ret


from .captioning import CaptioningDataset, prepare_captions  # noqa: E402  (NoCaps_VAL / TextCaps_VAL, Table 17)
from .video_qa import (DEFAULT_LIMIT, DOPVideoDemoDataset, VIDEO_QA_DATASETS,  # noqa: E402  (Table 18)
                       VideoQADataset, prepare_video_qa)

PLUGIN_DATASETS = (VQAv2Dataset, DOPDemoDataset, CaptioningDataset, TextVQATrainDataset, VideoQADataset,
                   DOPVideoDemoDataset)


def register_datasets() -> None:
    """Add the plugin datasets to VLMEvalKit's registry (idempotent)."""
    import vlmeval.dataset as vd

    for cls in PLUGIN_DATASETS:
        if cls not in vd.DATASET_CLASSES:
            vd.DATASET_CLASSES.append(cls)
            (vd.VIDEO_DATASET if cls.MODALITY == "VIDEO" else vd.IMAGE_DATASET).append(cls)
            vd.SUPPORTED_DATASETS.extend(cls.supported_datasets())
        setattr(vd, cls.__name__, cls)  # `--config` files name dataset classes as attributes of vlmeval.dataset


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmeval_dop.datasets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-vqav2", help="build LMUData/VQAv2_VAL.tsv or VQAv2_TestDev.tsv from the official files")
    p.add_argument("--split", choices=["val", "test-dev"], required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", help="answers (val only)")
    p.add_argument("--images", required=True, help="COCO image directory (val2014/ or test2015/)")
    p.add_argument("--out", help="output TSV (default: VLMEvalKit's data root)")
    p = sub.add_parser("prepare-textvqa-train", help="build LMUData/TextVQA_TRAIN.tsv (the search's validation data)")
    p.add_argument("--questions", required=True, help="TextVQA_0.5.1_train.json")
    p.add_argument("--images", required=True, help="train_images/ directory")
    p.add_argument("--out", help="output TSV (default: VLMEvalKit's data root)")
    p = sub.add_parser("vqav2-submission", help="EvalAI results json from a VQAv2_TestDev prediction file")
    p.add_argument("predictions")
    p.add_argument("out")
    p.add_argument("--all-questions", help="test2015 questions json: pad missing ids with empty answers (as LLaVA)")
    p = sub.add_parser("prepare-captions", help="build LMUData/NoCaps_VAL.tsv or TextCaps_VAL.tsv from the official files")
    p.add_argument("--dataset", choices=["nocaps", "textcaps"], required=True)
    p.add_argument("--annotations", required=True,
                   help="nocaps_val_4500_captions.json (NoCaps) or TextCaps_0.1_val.json (TextCaps)")
    p.add_argument("--images", required=True, help="image directory (NoCaps val images; TextCaps train_images/)")
    p.add_argument("--out", help="output TSV (default: VLMEvalKit's data root)")
    p = sub.add_parser(
        "prepare-video-qa", help="build LMUData/<name>.tsv for TGIF-QA / MSVD-QA / MSRVTT-QA (Table 18)",
        description="Build a video QA dataset (Table 18) from the official files. --annotations: Video-LLaVA's "
                    "GPT_Zero_Shot_QA/<X>_Zero_Shot_QA/test_q.json (test_a.json beside it), MSVD-QA / MSRVTT-QA "
                    "{train,val,test}_qa.json (Xu et al. 2017; MSVD also --video-map youtube_mapping.txt), or "
                    "TGIF-QA {Train,Test}_frameqa_question.csv. Videos: <videos>/<name>.{mp4,avi,mov,mkv} (TGIF: Video-LLaVA's mp4 conversions).")
    p.add_argument("--name", required=True, choices=list(VIDEO_QA_DATASETS),
                   help="TGIF_QA / MSVD_QA / MSRVTT_QA: evaluation sets; *_VAL: DOP search validation sets")
    p.add_argument("--annotations", required=True, help="test_q.json, *_qa.json or *_frameqa_question.csv")
    p.add_argument("--answers", help="test_a.json (default: beside test_q.json)")
    p.add_argument("--videos", required=True, help="the video folder")
    p.add_argument("--video-map", help="MSVD-QA youtube_mapping.txt (clip name -> vid<N>), for *_qa.json files")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"keep the first N questions in file order (default {DEFAULT_LIMIT}, the paper's 1K; 0 = all)")
    p.add_argument("--out", help="output TSV (default: VLMEvalKit's data root)")
    args = parser.parse_args(argv)
    if args.cmd == "prepare-video-qa":
        from .video_qa import VideoQAError

        try:
            print(prepare_video_qa(args.name, args.annotations, args.videos, args.answers, args.limit,
                                   args.video_map, args.out))
        except VideoQAError as exc:
            print(f"prepare-video-qa: error: {exc}", file=sys.stderr)
            return 2
    elif args.cmd == "prepare-captions":
        print(prepare_captions(args.dataset, args.annotations, args.images, args.out))
    elif args.cmd == "prepare-textvqa-train":
        print(prepare_textvqa_train(args.questions, args.images, args.out))
    elif args.cmd == "prepare-vqav2":
        print(prepare_vqav2(args.split, args.questions, args.images, args.out, args.annotations))
    else:
        ids = None
        if args.all_questions:
            ids = [q["question_id"] for q in json.loads(Path(args.all_questions).read_text())["questions"]]
        print(write_vqav2_submission(load(args.predictions), args.out, ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
