"""Captioning benchmarks of the paper's Table 17 (NoCaps, TextCaps) as VLMEvalKit plugin datasets, with CIDEr-D.

Protocol (paper App. E.6): LLaVA-1.5-7B, evaluated by the authors with lmms-eval on its `nocaps_val`
(the 4,500 NoCaps validation images, 10 references each) and `textcaps_val` (the 3,166 TextCaps validation
images, 5 references each) tasks. lmms-eval asks every image the same prompt, "Provide a one-sentence
caption for the provided image." (`CAPTION_PROMPT`), decodes greedily and scores with pycocoevalcap:
PTB tokenisation, then `Cider()` (which is CIDEr-D) over the whole split, reported raw, *not* x100 (so
LLaVA-1.5-7B's NoCaps 1.043 in Table 17 is what COCO-style tables print as 104.3).

- `cider_d(candidates, references)`: CIDEr-D (Vedantam et al. 2015, as the coco-caption reference code
  `pycocoevalcap/cider/cider_scorer.py` computes it), own implementation, no pycocoevalcap needed.
- `ptb_tokenize(text)`: a pure-Python stand-in for the Java Stanford PTBTokenizer that coco-caption runs
  before scoring (lowercase, clitics split off, punctuation tokens of its list dropped). It agrees on
  ordinary captions; exotic input (abbreviations, brackets, quotes inside words, currency, URLs) can be
  tokenised slightly differently, which can move CIDEr in the third decimal.
- `NoCaps_VAL`, `TextCaps_VAL` (`CaptioningDataset`, TYPE 'Caption' as VLMEvalKit's COCO_VAL): a local TSV
  `LMUData/<name>.tsv` (index, image_path, image_id, question, answer = JSON list of the references, and
  for NoCaps the domain) built from the official annotation files by
  `python -m vlmeval_dop.datasets prepare-captions --dataset nocaps|textcaps --annotations ... --images ...`.
  `evaluate()` writes `<pred>_score.json` ({"CIDEr": <Table 17 unit>, ...}) and `<pred>_results.xlsx`
  (per-image CIDEr-D).
"""
from __future__ import annotations

import json
import math
import os.path as osp
import re
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
from vlmeval.dataset.image_base import ImageBaseDataset
from vlmeval.smp import LMUDataRoot, dump, get_intermediate_file_path, load

# lmms-eval nocaps/_default_template_nocaps_yaml and textcaps/_default_template_textcaps_yaml
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

# dataset name -> (--dataset value of prepare-captions, official annotation file)
CAPTION_DATASETS = {
    "NoCaps_VAL": ("nocaps", "nocaps_val_4500_captions.json"),
    "TextCaps_VAL": ("textcaps", "TextCaps_0.1_val.json"),
}


class CaptionError(ValueError):
    """Bad input to the captioning metric or the dataset builder."""


# ------------------------------------------------------------------------------------------ tokeniser
# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after the Java PTBTokenizer has run
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# the raw characters the Java tokenizer turns into tokens of that list ("" -> `` / '', ( -> -LRB-, ...);
# square brackets become -LSB-/-RSB- there, not in the list: dropped here too (documented deviation)
_DROPPED = PTB_PUNCTUATION | {'"', "(", ")", "{", "}", "[", "]"}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")  # PTB splits these off the word
_LEAD = "\"'`([{$#"
_TRAIL = "\"'`)]}.,!?;:%"
_ABBREV = re.compile(r"^([a-z]\.){2,}$")  # "u.s." keeps its final period in PTB


def ptb_tokenize(text: str) -> list[str]:
    """Approximate coco-caption's tokenisation: Java PTBTokenizer (-lowerCase) + its punctuation filter.

    Lowercases, splits punctuation off word boundaries (keeping it inside words: "black-and-white",
    "3.5", "1,000"), splits the clitics n't 's 're 've 'll 'd 'm off as PTB does ("dog's" -> "dog 's",
    "don't" -> "do n't"), then drops the tokens of `PTB_PUNCTUATION` (brackets are dropped, as the Java
    tokenizer turns them into -LRB- etc. which are in that list). `$ # %` are kept as separate tokens
    as PTB does. Deviation: the Java tokenizer's special cases (abbreviations other than "u.s."-style
    letter-dot runs, URLs, emoticons, unicode quotes and dashes) are not reproduced, and square brackets
    are dropped (Java keeps them as -LSB-/-RSB-), so rare captions can tokenise slightly differently.
    """
    tokens: list[str] = []
    for chunk in str(text).lower().replace("\n", " ").split():
        lead, trail = [], []
        while chunk and chunk[0] in _LEAD:
            lead.append(chunk[0])
            chunk = chunk[1:]
        while chunk and chunk[-1] in _TRAIL and not _ABBREV.match(chunk):
            # "..." is one PTB token; any other trailing character is its own token
            if chunk.endswith("...") and len(chunk) >= 3:
                trail.insert(0, "...")
                chunk = chunk[:-3]
            else:
                trail.insert(0, chunk[-1])
                chunk = chunk[:-1]
        words = []
        if chunk:
            m = _CLITIC.match(chunk)
            words = [m.group(1), m.group(2)] if m else [chunk]
        tokens.extend(lead + words + trail)
    return [t for t in tokens if t and t not in _DROPPED]


# ------------------------------------------------------------------------------------------ CIDEr-D
def _ngram_counts(tokens: list[str], n: int) -> Counter:
    """Counts of all 1..n-grams of a token list (tuples as keys)."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tfidf(counts: Counter, df: dict, log_n_docs: float, n: int):
    """Per-order tf-idf vectors, their L2 norms and the length CIDEr-D's penalty uses.

    Weight of an n-gram: tf * (log(#images) - log(max(1, df))), df = number of images whose references
    contain it. The "length" is the number of *bigrams* (coco-caption's `counts2vec` counts n-grams of
    index 1), i.e. #words - 1 for non-empty text; only differences of lengths matter.
    """
    vec = [dict() for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        w = tf * (log_n_docs - math.log(max(1.0, df.get(gram, 0.0))))
        vec[k][gram] = w
        norm[k] += w * w
        if k == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(candidates: dict, references: dict, n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, dict]:
    """CIDEr-D of one candidate caption per item against its reference captions (corpus-level idf).

    As defined by Vedantam et al. (CVPR 2015, sec. 3 and the CIDEr-D variant of the COCO server) and
    computed by coco-caption's `CiderScorer` (pycocoevalcap `Cider()`, defaults n = 4, sigma = 6):
      - document frequency df(g) = number of items whose reference set contains n-gram g; the idf is
        log(#items) - log(max(1, df(g))), so the idf comes from the references of the scored corpus only;
      - for each order k = 1..n: the cosine of the candidate's and a reference's tf-idf vectors, where
        the candidate's weights are clipped by the reference's (numerator sum of min(c, r) * r over the
        candidate's k-grams, denominator the unclipped norms), times the Gaussian length penalty
        exp(-(len_c - len_r)^2 / (2 sigma^2));
      - per item: the mean over orders, then the mean over references, times 10;
      - corpus score: the mean of the per-item scores (not x100: the unit of lmms-eval and Table 17).

    Args:
        candidates: item id -> candidate caption (one string; a one-element list is accepted).
        references: item id -> list of reference captions (at least one); same ids as `candidates`.
        tokenize: run `ptb_tokenize` on all captions first (as coco-caption does); False = the captions
            are already tokenised and are split on whitespace.

    Returns:
        (corpus score, {item id: score}).

    Raises:
        CaptionError: ids that differ between the two dicts (naming some), an item without references,
            an empty corpus, a candidate given as a list of several captions.
    """
    if not isinstance(candidates, dict) or not isinstance(references, dict):
        raise CaptionError("cider_d takes two dicts: candidates {id: caption}, references {id: [captions]}")
    if not candidates:
        raise CaptionError("cider_d needs at least one item")
    missing = [k for k in references if k not in candidates]
    extra = [k for k in candidates if k not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no candidate for {len(missing)} id(s), e.g. {missing[:5]}")
        if extra:
            parts.append(f"no references for {len(extra)} id(s), e.g. {extra[:5]}")
        raise CaptionError("candidates and references must have the same ids: " + "; ".join(parts))
    if n < 1 or sigma <= 0:
        raise CaptionError(f"n must be >= 1 and sigma > 0, got n={n}, sigma={sigma}")
    split = ptb_tokenize if tokenize else (lambda s: str(s).split())

    cand_counts, ref_counts = {}, {}
    for key, cand in candidates.items():
        if isinstance(cand, (list, tuple)):
            if len(cand) != 1:
                raise CaptionError(f"item {key!r}: one candidate caption expected, got {len(cand)}")
            cand = cand[0]
        refs = references[key]
        if isinstance(refs, str) or not refs:
            raise CaptionError(f"item {key!r}: references must be a non-empty list of captions, got {refs!r}")
        cand_counts[key] = _ngram_counts(split(cand), n)
        ref_counts[key] = [_ngram_counts(split(r), n) for r in refs]

    df: dict = defaultdict(float)
    for refs in ref_counts.values():
        for gram in set(g for r in refs for g in r):
            df[gram] += 1.0
    log_n_docs = math.log(float(len(ref_counts)))

    per_item = {}
    for key, cc in cand_counts.items():
        vc, nc, lc = _tfidf(cc, df, log_n_docs, n)
        total = 0.0
        for rc in ref_counts[key]:
            vr, nr, lr = _tfidf(rc, df, log_n_docs, n)
            penalty = math.exp(-((lc - lr) ** 2) / (2.0 * sigma ** 2))
            sims = 0.0
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    dot /= nc[k] * nr[k]
                sims += dot * penalty
            total += sims / n
        per_item[key] = 10.0 * total / len(ref_counts[key])
    return sum(per_item.values()) / len(per_item), per_item


# ------------------------------------------------------------------------------------------ dataset
def _refs(cell) -> list[str]:
    """The reference list stored in a TSV cell (a JSON list)."""
    if isinstance(cell, list):
        return [str(x) for x in cell]
    return [str(x) for x in json.loads(str(cell))]


class CaptioningDataset(ImageBaseDataset):
    """NoCaps (val) and TextCaps (val) as VLMEvalKit datasets, scored with CIDEr-D (Table 17's unit).

    Data: `LMUData/<name>.tsv` built by `prepare_captions` (images by path, as VQAv2_VAL). Prompt: the
    image and `CAPTION_PROMPT`, lmms-eval's prompt for both tasks, stored in the `question` column so
    that wrappers with their own prompt logic see the same text (LLaVA keeps the dataset prompt for
    non-MCQ datasets: `USER: <image>\\nProvide a one-sentence caption ... ASSISTANT:`, as lmms-eval's llava).

    InternVL's wrapper uses the `question` column as its prompt for this TYPE, Qwen2.5-VL the dataset's.

    Deviations from lmms-eval: generation length is the model entry's `max_new_tokens`, not lmms-eval's
    per-task 1024 (NoCaps) / 64 (TextCaps) (greedy one-sentence captions end far earlier); images are
    read from the official files instead of the lmms-lab HF copies; the PTB tokenisation is approximated
    (`ptb_tokenize`).
    """

    TYPE = "Caption"
    DATASET_URL = {name: "" for name in CAPTION_DATASETS}  # no public TSV: built locally (prepare_captions)
    DATASET_MD5 = {}

    def load_data(self, dataset):
        path = osp.join(LMUDataRoot(), f"{dataset}.tsv")
        if not osp.exists(path):
            which, ann = CAPTION_DATASETS[dataset]
            images = "NoCaps validation images (the Open Images files named in it)" if which == "nocaps" \
                else "TextVQA/TextCaps train_images/"
            raise FileNotFoundError(
                f"{path} not found. {dataset} is built from the official annotation file {ann} and the "
                f"{images}: python -m vlmeval_dop.datasets prepare-captions --dataset {which} "
                f"--annotations <{ann}> --images <image dir>"
            )
        self.data_path = path
        return load(path)

    def evaluate(self, eval_file, **judge_kwargs):
        """CIDEr-D of the predictions: `_score.json` (corpus CIDEr, + per NoCaps domain) and `_results`.

        "CIDEr" is the corpus score over all predictions, raw as lmms-eval reports it (Table 17's unit;
        VLMEvalKit's COCO_VAL writes x100). NoCaps' per-domain scores (`CIDEr_in-domain`, ...) are
        CIDEr-D on each domain's images alone (the idf then comes from that domain's references, as when
        the coco-caption scorer is run on the subset); Table 17 uses the overall score only.
        """
        data = load(eval_file)
        preds = ["" if (isinstance(p, float) and math.isnan(p)) else str(p) for p in data["prediction"]]
        keys = [str(i) for i in data["index"]]
        cands = dict(zip(keys, preds))
        refs = {k: _refs(a) for k, a in zip(keys, data["answer"])}
        score, per_item = cider_d(cands, refs)
        data["cider"] = [per_item[k] for k in keys]
        dump(data, get_intermediate_file_path(eval_file, "_results"))
        ret = {"CIDEr": float(score), "num_images": int(len(keys))}
        if "domain" in data:
            for dom in sorted(set(map(str, data["domain"]))):
                sub = [k for k, d in zip(keys, data["domain"]) if str(d) == dom]
                ret[f"CIDEr_{dom}"] = float(cider_d({k: cands[k] for k in sub}, {k: refs[k] for k in sub})[0])
        dump(ret, get_intermediate_file_path(eval_file, "_score", "json"))
        return ret


# ------------------------------------------------------------------------------------------ builder
def _nocaps_rows(raw: dict, images: str) -> list[dict]:
    """NoCaps val (nocaps_val_4500_captions.json): COCO-style `images` + `annotations` (10 per image)."""
    if not isinstance(raw, dict) or "images" not in raw or "annotations" not in raw:
        raise CaptionError("a NoCaps annotation file is COCO-style: a dict with 'images' and 'annotations'")
    caps = defaultdict(list)
    for a in raw["annotations"]:
        caps[a["image_id"]].append(a["caption"])
    rows = []
    for im in raw["images"]:
        if not caps.get(im["id"]):
            raise CaptionError(f"NoCaps image {im['id']} ({im.get('file_name')}) has no caption in 'annotations'")
        rows.append({"image_id": im["id"], "file": im["file_name"], "answer": caps[im["id"]],
                     "domain": im.get("domain", "")})
    return rows


def _textcaps_rows(raw: dict, images: str) -> list[dict]:
    """TextCaps val (TextCaps_0.1_val.json): `data`, one entry per caption; one row per image_id."""
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise CaptionError("a TextCaps annotation file is a dict with a 'data' list (TextCaps_0.1_val.json)")
    by_image: dict = {}
    for e in raw["data"]:
        iid = e["image_id"]
        row = by_image.setdefault(iid, {"image_id": iid, "answer": [],
                                        "file": osp.basename(e.get("image_path") or f"{iid}.jpg")})
        if e.get("reference_strs"):  # every caption entry of an image repeats all of its references
            row["answer"] = list(e["reference_strs"])
        elif "caption_str" in e and "reference_strs" not in e:
            row["answer"].append(e["caption_str"])
    for iid, row in by_image.items():
        if not row["answer"]:
            raise CaptionError(f"TextCaps image {iid!r} has no reference_strs / caption_str")
    return list(by_image.values())


def prepare_captions(dataset: str, annotations: str, images: str, out: str | None = None) -> str:
    """Build `LMUData/NoCaps_VAL.tsv` or `TextCaps_VAL.tsv` from the official annotation file.

    Args:
        dataset: `nocaps` (nocaps_val_4500_captions.json: COCO-style images/annotations, 10 captions per
            image) or `textcaps` (TextCaps_0.1_val.json: `data` entries with image_id, reference_strs).
        annotations: the official json file.
        images: the directory holding the images (NoCaps: the val images by `file_name`; TextCaps: the
            TextVQA/TextCaps `train_images/`, by the basename of `image_path`). Images are referenced by
            absolute path; every one must exist.
        out: output TSV (default: VLMEvalKit's data root).
    """
    names = {v[0]: k for k, v in CAPTION_DATASETS.items()}
    if dataset not in names:
        raise CaptionError(f"dataset must be one of {', '.join(names)}, got {dataset!r}")
    raw = json.loads(Path(annotations).read_text())
    rows = (_nocaps_rows if dataset == "nocaps" else _textcaps_rows)(raw, images)
    if not rows:
        raise CaptionError(f"{annotations} holds no images")
    paths = [osp.abspath(osp.join(images, r["file"])) for r in rows]
    absent = [p for p in paths if not osp.exists(p)]
    if absent:
        raise FileNotFoundError(f"{len(absent)} of {len(paths)} images are not in {images}, e.g. {absent[0]}")
    df = pd.DataFrame({
        "index": range(len(rows)),
        "image_path": paths,
        "image_id": [r["image_id"] for r in rows],
        "question": CAPTION_PROMPT,
        "answer": [json.dumps(r["answer"]) for r in rows],
    })
    if dataset == "nocaps":
        df["domain"] = [r["domain"] for r in rows]
    out = out or osp.join(LMUDataRoot(), f"{names[dataset]}.tsv")
    df.to_csv(out, sep="\t", index=False)
    return out
