"""Video QA benchmarks of the paper's Table 18 (TGIF-QA, MSVD-QA, MSRVTT-QA) as VLMEvalKit video datasets.

Protocol (paper App. E.7, "following VisPruner's video benchmark settings"): Video-LLaVA-7B, 8 frames of
224 px, the first 1K samples of each benchmark, scored by Video-LLaVA's GPT-assisted evaluation
(`videollava/eval/video/eval_video_qa.py` of PKU-YuanGroup/Video-LLaVA, the Video-ChatGPT judge): the judge
sees question, correct answer and prediction and replies with a Python dict `{'pred': 'yes'|'no', 'score':
0-5}`; accuracy = share of "yes", score = mean of the integer scores. Video-LLaVA's scripts use
`gpt-3.5-turbo` (`JUDGE_MODEL`); the DOP paper does not name its judge. The scripts call the API with its
default temperature (1.0), which is what we send (`JUDGE_TEMPERATURE`); `--judge-args '{"temperature": 0}'`
makes the judge deterministic.

- Data: `LMUData/<name>.tsv` (index, video, video_path, question, answer, question_id[, type]) built by
  `python -m vlmeval_dop.datasets prepare-video-qa --name <name> --annotations <file> --videos <dir>` from
  the official annotation files (`prepare_video_qa`, three formats, see there). Names: `TGIF_QA`,
  `MSVD_QA`, `MSRVTT_QA` (the evaluation sets of Table 18) and `<name>_VAL` (validation sets for the DOP
  policy search, from a split disjoint from the evaluation one).
- Prompt: the video and the bare question, as Video-LLaVA's `run_inference_video_qa.py` (which adds only the
  8 `<image>` tokens and its chat template, the model wrapper's business). A video-LLM wrapper
  (`VIDEO_LLM = True`) gets the video file and samples its frames itself; other wrappers get 8 frames
  sampled at Video-LLaVA's indices `np.linspace(0, n_frames - 1, 8, dtype=int)`.
- Judge: VLMEvalKit's own `build_judge` (an OpenAI-compatible endpoint, configured as for any VLMEvalKit
  judge: `--judge`, `--judge-base-url`, `--judge-key`, `--judge-args`, or `OPENAI_API_KEY` /
  `OPENAI_API_BASE` in the environment or VLMEvalKit's `.env`). Without a key, `evaluate()` raises
  `JudgeNotConfiguredError` before anything is written.
- `DOP_VideoDemo`: 6 generated mp4 videos (moving coloured shapes) with exactly known answers, scored by
  exact match (no judge, no download), for `python run.py --model tiny_videollava_dopv --data DOP_VideoDemo`.
"""
from __future__ import annotations

import ast
import json
import math
import os
import os.path as osp
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from vlmeval.dataset.video_base import VideoBaseDataset
from vlmeval.smp import LMUDataRoot, dump, get_intermediate_file_path, load

from .fileio import atomic_write_text, fingerprint

# ------------------------------------------------------------------------------------------ the judge
JUDGE_MODEL = "gpt-3.5-turbo"  # Video-LLaVA's eval_video_qa.py (model="gpt-3.5-turbo")
JUDGE_TEMPERATURE = 1.0  # the scripts pass no temperature: the OpenAI API default, 1.0
PARSE_RETRIES = 3  # extra judge calls for a reply that is not the requested dict (the official loop never stops)

# Video-LLaVA videollava/eval/video/eval_video_qa.py (= Video-ChatGPT's quantitative_evaluation), verbatim
JUDGE_SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {pred}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


class JudgeNotConfiguredError(ValueError):
    """No API key for the judge: nothing was sent and nothing written."""


def judge_prompt(question, answer, prediction) -> str:
    """The user message the judge sees for one sample (Video-LLaVA's wording)."""
    return JUDGE_USER_PROMPT.format(question=question, answer=answer, pred=prediction)


def parse_judge_reply(reply) -> tuple[str, int] | None:
    """("yes" | "no", score) from a judge reply, or None when the reply is malformed.

    As Video-LLaVA's script: `ast.literal_eval` of the reply must give a dict with 'pred' and 'score';
    the score counts as `int(score)` (4.8 -> 4, "4" -> 4); 'pred' is "yes" when it contains "yes", else "no"
    when it contains "no". Anything else (no dict, missing keys, a score int() rejects, a pred with neither
    word) is malformed; the official script would ask again, as `judge_sample` does.
    """
    try:
        parsed = ast.literal_eval(str(reply).strip())
        pred, score = parsed["pred"], int(parsed["score"])
    except Exception:  # any reply the official parsing rejects
        return None
    if isinstance(parsed["score"], bool) or not isinstance(pred, str):
        return None
    verdict = "yes" if "yes" in pred.lower() else "no" if "no" in pred.lower() else None
    return None if verdict is None else (verdict, score)


def judge_sample(judge, question, answer, prediction, retries: int = PARSE_RETRIES) -> dict:
    """Ask `judge` (a VLMEvalKit API model) about one sample; never raises.

    A malformed reply is asked again up to `retries` times; VLMEvalKit's own retries cover HTTP errors, and
    a reply equal to its failure message (the endpoint kept failing) is not asked again. Returns
    {"verdict": "yes" | "no" | "failed", "score": int (0 when failed), "reply": last raw reply, "calls": n}.
    """
    prompt = [dict(type="text", value=judge_prompt(question, answer, prediction))]
    reply, calls = "", 0
    for _ in range(1 + max(0, int(retries))):
        calls += 1
        try:
            out = judge.generate(prompt)
        except Exception as exc:  # a judge that raises is a failed call, never a crashed evaluation
            out = f"{type(exc).__name__}: {exc}"
        reply = out.get("prediction", "") if isinstance(out, dict) else str(out)
        parsed = parse_judge_reply(reply)
        if parsed is not None:
            return {"verdict": parsed[0], "score": parsed[1], "reply": reply, "calls": calls}
        if getattr(judge, "fail_msg", None) and judge.fail_msg in reply:
            break
    return {"verdict": "failed", "score": 0, "reply": reply, "calls": calls}


def judge_metrics(verdicts, scores) -> dict:
    """Table 18's numbers from per-sample verdicts ("yes" / "no" / "failed") and integer scores.

    `acc` (percent) and `score` are over all samples, a failed judgement counting as "no" with score 0 (so a
    failure can never raise a number); `acc_judged` / `score_judged` leave failed samples out, which is what
    Video-LLaVA's script reports once every sample is judged. With no failures the two pairs agree.
    """
    verdicts, scores = list(verdicts), [int(s) for s in scores]
    n = len(verdicts)
    if n == 0:
        raise ValueError("no samples to score")
    yes, no = verdicts.count("yes"), verdicts.count("no")
    judged = yes + no
    valid_scores = [s for v, s in zip(verdicts, scores) if v != "failed"]
    return {
        "acc": 100.0 * yes / n,
        "score": float(sum(valid_scores)) / n,
        "acc_judged": 100.0 * yes / judged if judged else math.nan,
        "score_judged": float(sum(valid_scores)) / judged if judged else math.nan,
        "n": n, "yes": yes, "no": no, "judge_failed": n - judged,
    }


def _judge_settings(judge_kwargs: dict) -> tuple[str, dict]:
    """(judge model name, build_judge kwargs) from VLMEvalKit's judge kwargs; raises JudgeNotConfiguredError
    when no API key is configured (VLMEvalKit's `--judge-key`, or OPENAI_API_KEY in the environment / .env)."""
    from vlmeval.smp import load_env

    kw = dict(judge_kwargs)
    model = kw.pop("model", None) or JUDGE_MODEL
    if model == "exact_matching":
        raise JudgeNotConfiguredError(
            "--judge exact_matching: TGIF/MSVD/MSRVTT-QA are scored by the GPT judge of Video-LLaVA's evaluation "
            f"(default {JUDGE_MODEL}); give an OpenAI-compatible judge")
    load_env()  # VLMEvalKit's .env, as build_judge reads it
    azure = bool(kw.get("use_azure"))
    key = kw.get("key") or os.environ.get("AZURE_OPENAI_API_KEY" if azure else "OPENAI_API_KEY", "")
    if not str(key).strip():
        raise JudgeNotConfiguredError(
            f"no judge configured: the video QA scores need an OpenAI-compatible judge (default {JUDGE_MODEL}, "
            "as Video-LLaVA's evaluation). Configure it as for any VLMEvalKit judge: OPENAI_API_KEY (and "
            "OPENAI_API_BASE for another endpoint, e.g. http://host:port/v1/chat/completions) in VLMEvalKit's "
            ".env or the environment, or run.py --judge-key KEY [--judge-base-url URL] [--judge MODEL]. "
            "Nothing was written; rerun with --reuse to score the saved predictions")
    kw.setdefault("temperature", JUDGE_TEMPERATURE)
    kw["system_prompt"] = JUDGE_SYSTEM_PROMPT
    return model, kw


# ------------------------------------------------------------------------------------------ datasets
# name -> (paper benchmark, split the TSV is built from)
VIDEO_QA_DATASETS = {
    "TGIF_QA": ("TGIF-QA", "test"),
    "MSVD_QA": ("MSVD-QA", "test"),
    "MSRVTT_QA": ("MSRVTT-QA", "test"),
    "TGIF_QA_VAL": ("TGIF-QA", "train (FrameQA has no val split)"),
    "MSVD_QA_VAL": ("MSVD-QA", "val"),
    "MSRVTT_QA_VAL": ("MSRVTT-QA", "val"),
}
DEFAULT_LIMIT = 1000  # "the first 1K samples from each benchmark" (App. E.7)
NFRAMES = 8  # Video-LLaVA: 8 frames of 224 px
# Video-LLaVA's run_inference_video_qa.py tries these, in this order. TGIF's raw GIFs are not among them (decord
# cannot measure them): Video-LLaVA evaluates its mp4 conversions (GPT_Zero_Shot_QA/TGIF_Zero_Shot_QA/mp4)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


class VideoQAError(ValueError):
    """Bad input to prepare_video_qa (the message names the file, the row and the problem)."""


def video_frame_indices(n_frames: int, num: int = NFRAMES) -> list[int]:
    """Video-LLaVA's frame choice (LanguageBind `load_and_transform_video`, decord / opencv backends):
    `np.linspace(0, n_frames - 1, num, dtype=int)`; repeats frames of videos shorter than `num`."""
    if n_frames < 1:
        raise ValueError("a video needs at least one frame")
    return [int(i) for i in np.linspace(0, n_frames - 1, num, dtype=int)]


def _frame_count(path: str) -> int:
    """Number of decodable frames of a video file (decord, as Video-LLaVA's default backend)."""
    import decord

    return len(decord.VideoReader(path, num_threads=1))


class VideoQADataset(VideoBaseDataset):
    """TGIF-QA / MSVD-QA / MSRVTT-QA (and their `_VAL` search sets) as VLMEvalKit video datasets.

    Data: `LMUData/<name>.tsv` from `prepare_video_qa` (videos referenced by absolute path). `nframe` = 8
    (Video-LLaVA). `evaluate()` asks the judge (VLMEvalKit's `build_judge`, default `JUDGE_MODEL`) and writes
    `<pred>_score.json` (acc, score, counts, the judge's name), `<pred>_<judge>_results.<fmt>` (one row per
    sample: verdict, score, raw reply, calls) and the judge cache `<pred>_<judge>_tmp.pkl` (failed samples
    are asked again on the next evaluation).
    """

    TYPE = "Video-VQA"
    MODALITY = "VIDEO"
    DEFAULT_JUDGE = JUDGE_MODEL

    def __init__(self, dataset="MSVD_QA", pack=False, nframe=NFRAMES, fps=-1):
        if pack:
            raise ValueError(f"{dataset}: pack mode (all questions of a video in one prompt) is not supported")
        super().__init__(dataset=dataset, pack=False, nframe=nframe, fps=fps)

    @classmethod
    def supported_datasets(cls):
        return list(VIDEO_QA_DATASETS)

    def prepare_dataset(self, dataset):
        path = osp.join(LMUDataRoot(), f"{dataset}.tsv")
        if not osp.exists(path):
            bench, split = VIDEO_QA_DATASETS[dataset]
            raise FileNotFoundError(
                f"{path} not found. {dataset} is built from the official {bench} annotations ({split} split) and "
                f"videos: python -m vlmeval_dop.datasets prepare-video-qa --name {dataset} --annotations <file> "
                "--videos <dir> (see `python -m vlmeval_dop.datasets prepare-video-qa --help` for the files)")
        self.data_path = path
        return dict(root=LMUDataRoot(), data_file=path)

    def _line(self, line) -> pd.Series:
        if isinstance(line, (int, np.integer)):
            return self.data.iloc[int(line)]
        if isinstance(line, dict):
            return pd.Series(line)
        return line

    def frame_files(self, line) -> list[str]:
        """The `nframe` frames of a row's video at Video-LLaVA's indices, saved once as jpg under
        `LMUData/images/<dataset>/<video>/` (for wrappers that take images, not videos)."""
        import decord
        import portalocker
        from PIL import Image

        line = self._line(line)
        paths = self.frame_paths(str(line["video"]))
        # the frames are keyed by the video file they come from (a dataset rebuilt from other files of the same
        # names gets new frames): path, size and modification time, stamped next to them
        src = Path(str(line["video_path"])).resolve()
        st = src.stat()
        source = f"{src}|{st.st_size}|{st.st_mtime_ns}|{self.nframe}"
        stamp = Path(paths[0]).parent / "source.txt"

        def fresh() -> bool:
            return all(osp.exists(p) for p in paths) and stamp.exists() and stamp.read_text() == source

        if fresh():
            return paths
        with portalocker.Lock(osp.join(self.frame_root, f"{line['video']}.lock"), "w", timeout=30):
            if not fresh():
                vr = decord.VideoReader(str(src), num_threads=1)
                frames = vr.get_batch(video_frame_indices(len(vr), self.nframe)).asnumpy()
                for arr, p in zip(frames, paths):
                    Image.fromarray(arr).save(p)
                atomic_write_text(stamp, source)
        return paths

    def build_prompt(self, line, video_llm=True):
        """[video, question] for video LLMs, [8 frames..., question] otherwise (VLMEvalKit's convention)."""
        line = self._line(line)
        question = str(line["question"])
        if video_llm:
            return [dict(type="video", value=str(line["video_path"])), dict(type="text", value=question)]
        return [dict(type="image", value=p) for p in self.frame_files(line)] + [dict(type="text", value=question)]

    def evaluate(self, eval_file, **judge_kwargs):
        """Judge every prediction (Video-LLaVA's judge prompt through VLMEvalKit's `build_judge`) and write
        `<pred>_score.json` with `judge_metrics` + the judge's name; returns that dict.

        Raises JudgeNotConfiguredError (nothing written) when no API key is configured.
        """
        from vlmeval.dataset.utils import build_judge

        data = load(eval_file)
        missing = [c for c in ("index", "question", "answer", "prediction") if c not in data]
        if missing:
            raise VideoQAError(f"{eval_file}: missing column(s) {', '.join(missing)}")
        judge_name, kw = _judge_settings(judge_kwargs)
        nproc = int(kw.pop("nproc", 4) or 4)
        judge = build_judge(model=judge_name, **kw)
        tag = judge_name.replace("/", "_")
        tmp_file = get_intermediate_file_path(eval_file, f"_{tag}_tmp", "pkl")
        # cache keys carry everything the judgement depends on: the endpoint the judge really calls (also when
        # OPENAI_API_BASE names it), not how requests are sent (a resumed run may change those)
        settings = {k: v for k, v in kw.items() if k not in _TRANSPORT_SETTINGS}
        settings["api_base"] = getattr(judge, "api_base", kw.get("api_base"))
        rows = {}
        for _, r in data.iterrows():
            rows[_judge_key(judge_name, settings, r["index"], r["question"], r["answer"], _text(r["prediction"]))] = r
        keys = list(rows)
        cache = load(tmp_file) if osp.exists(tmp_file) else {}
        cache = {k: v for k, v in cache.items()
                 if k in rows and isinstance(v, dict) and v.get("verdict") in ("yes", "no")}
        dump(cache, tmp_file)  # failed judgements, and those of changed predictions, are asked again
        todo = [k for k in keys if k not in cache]
        tasks = [dict(judge=judge, question=rows[k]["question"], answer=rows[k]["answer"],
                      prediction=_text(rows[k]["prediction"])) for k in todo]
        if tasks:
            _judge_all(tasks, todo, nproc, tmp_file, cache)
        results = load(tmp_file)
        out = data.copy()
        out["judge_verdict"] = [results[k]["verdict"] for k in keys]
        out["judge_score"] = [results[k]["score"] for k in keys]
        out["judge_reply"] = [results[k]["reply"] for k in keys]
        out["judge_calls"] = [results[k]["calls"] for k in keys]
        dump(out, get_intermediate_file_path(eval_file, f"_{tag}_results"))
        metrics = judge_metrics(out["judge_verdict"], out["judge_score"])
        metrics["judge"] = judge.model
        dump(metrics, get_intermediate_file_path(eval_file, "_score", "json"))
        if metrics["judge_failed"]:
            print(f"{self.dataset_name}: the judge gave no usable reply for {metrics['judge_failed']} of "
                  f"{metrics['n']} samples (counted as 'no', score 0; evaluate again to retry them)")
        return metrics


def _judge_all(tasks: list[dict], keys: list[str], nproc: int, save: str, done: dict) -> None:
    """Run `judge_sample(**task)` on `nproc` threads, adding each result to `done` under its key and saving `done`
    to `save` (pickle, replaced atomically) as soon as it is back.

    Unlike VLMEvalKit's `track_progress_rich`, a crash (Ctrl-C, an error escaping a call) cancels the calls not yet
    started and keeps the results of those under way once they return: no judgement that was paid for is lost,
    and none is sent after the crash."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    def save_now():
        tmp = f"{save}.part"
        with open(tmp, "wb") as fh:
            pickle.dump(done, fh)
        os.replace(tmp, save)  # never a truncated cache, whenever the run stops

    pool = ThreadPoolExecutor(max_workers=max(1, nproc))
    futures = {pool.submit(judge_sample, **task): key for task, key in zip(tasks, keys)}
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc="judge"):
            done[futures[future]] = future.result()
            save_now()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for future, key in futures.items():
            if key not in done and not future.cancelled() and future.exception() is None:
                done[key] = future.result()
        save_now()


# judge kwargs that change how requests are sent, never a verdict (VLMEvalKit run.py's nproc / verbose / retry /
# timeout, the API key): left out of the cache key, so that a rerun after a crash keeps the finished judgements
_TRANSPORT_SETTINGS = ("key", "nproc", "verbose", "retry", "timeout", "wait")


def _judge_key(judge_name: str, settings: dict, index, question, answer, prediction) -> str:
    """Cache key of one judgement: the sample's index and a digest of the judge, its settings, the prompt and
    the sample's question, answer and prediction (a changed prediction or judge is judged again)."""
    kept = {k: str(v) for k, v in settings.items() if k not in _TRANSPORT_SETTINGS}
    return f"{index}:{fingerprint(judge_name, kept, judge_prompt(str(question), str(answer), prediction))}"


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


# ------------------------------------------------------------------------------------------ builder
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VideoQAError(f"{path}: not a readable JSON file ({exc})") from None


def _answers_file(questions: Path, answers: str | None) -> Path:
    if answers:
        return Path(answers)
    name = questions.name
    for q, a in (("_q.json", "_a.json"), ("_q", "_a")):
        if q in name:
            return questions.with_name(name.replace(q, a, 1))
    raise VideoQAError(f"{questions}: a Video-ChatGPT question file needs its answers file (test_a.json): "
                       "pass --answers")


def _rows_videochatgpt(questions: Path, qs: list, answers: str | None) -> list[dict]:
    """Video-ChatGPT / Video-LLaVA format (`GPT_Zero_Shot_QA/<X>_Zero_Shot_QA/test_q.json` + `test_a.json`):
    questions [{video_name, question, question_id}], answers [{answer, question_id[, type]}], paired by
    position as Video-LLaVA's run_inference_video_qa.py pairs them (question_ids checked to agree)."""
    apath = _answers_file(questions, answers)
    if not apath.is_file():
        raise VideoQAError(f"answers file {apath} not found (the test_a.json beside {questions.name}); pass --answers")
    ans = _read_json(apath)
    if not isinstance(ans, list):
        raise VideoQAError(f"{apath}: expected a list of {{answer, question_id}} objects")
    if len(ans) != len(qs):
        raise VideoQAError(f"{questions} has {len(qs)} questions but {apath} has {len(ans)} answers")
    rows = []
    for i, (q, a) in enumerate(zip(qs, ans)):
        where = f"{questions} item {i}"
        if not isinstance(q, dict) or not {"video_name", "question"} <= set(q):
            raise VideoQAError(f"{where}: expected keys video_name, question, question_id")
        if not isinstance(a, dict) or "answer" not in a:
            raise VideoQAError(f"{apath} item {i}: expected keys answer, question_id")
        if "question_id" in q and "question_id" in a and str(q["question_id"]) != str(a["question_id"]):
            raise VideoQAError(f"{where}: question_id {q['question_id']!r} but {apath.name} item {i} has "
                               f"question_id {a['question_id']!r}; the two files must be in the same order")
        row = {"names": [str(q["video_name"])], "video": str(q["video_name"]), "question": q["question"],
               "answer": a["answer"], "question_id": q.get("question_id", i)}
        if "type" in a:
            row["type"] = a["type"]
        rows.append(row)
    return rows


def _read_video_map(path: str | None) -> dict[str, str]:
    """MSVD-QA's youtube_mapping.txt: lines `<clip name> vid<N>` -> {"vid<N>": clip name}."""
    if not path:
        return {}
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise VideoQAError(f"{path} line {n}: expected '<clip name> vid<N>', got {line!r}")
        out[parts[1]] = parts[0]
    return out


def _rows_xu2017(path: Path, qs: list, video_map: dict[str, str]) -> list[dict]:
    """MSVD-QA / MSRVTT-QA release of Xu et al. 2017 (`{train,val,test}_qa.json`): [{answer, id, question,
    video_id[, category_id]}]. Videos: MSRVTT `video<video_id>`; MSVD `vid<video_id>` mapped to the clip name
    by youtube_mapping.txt (--video-map)."""
    rows = []
    for i, q in enumerate(qs):
        if not isinstance(q, dict) or not {"video_id", "question", "answer"} <= set(q):
            raise VideoQAError(f"{path} item {i}: expected keys video_id, question, answer, id")
        vid = str(q["video_id"])
        names = [video_map[f"vid{vid}"]] if f"vid{vid}" in video_map else []
        names += [f"video{vid}", f"vid{vid}", vid]
        row = {"names": names, "video": names[0], "question": q["question"], "answer": q["answer"],
               "question_id": q.get("id", i)}
        if "category_id" in q:
            row["type"] = q["category_id"]
        rows.append(row)
    return rows


def _rows_frameqa(path: Path) -> list[dict]:
    """TGIF-QA FrameQA (YunseokJANG/tgif-qa `dataset/{Train,Test}_frameqa_question.csv`, tab-separated despite
    the name): gif_name, question, answer, type, vid_id, key, description."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise VideoQAError(f"{path}: not a readable tab-separated file ({exc})") from None
    need = {"gif_name", "question", "answer"}
    if not need <= set(df.columns):
        raise VideoQAError(f"{path}: a TGIF-QA FrameQA file has the columns gif_name, question, answer, type, vid_id, "
                           f"key (has: {', '.join(df.columns)})")
    return [{"names": [r["gif_name"]], "video": r["gif_name"], "question": r["question"], "answer": r["answer"],
             "question_id": r.get("vid_id", i), **({"type": r["type"]} if "type" in r else {})}
            for i, (_, r) in enumerate(df.iterrows())]


def read_video_qa_annotations(annotations: str, answers: str | None = None,
                              video_map: str | None = None) -> tuple[str, list[dict]]:
    """(format, rows) of an official annotation file; the format is recognised from the content:

    - `videochatgpt`: Video-LLaVA's GPT_Zero_Shot_QA files (`test_q.json` + `test_a.json`), the data of the
      paper's protocol for all three benchmarks;
    - `xu2017`: MSVD-QA / MSRVTT-QA `{train,val,test}_qa.json` (+ MSVD's youtube_mapping.txt);
    - `tgif_frameqa`: TGIF-QA `{Train,Test}_frameqa_question.csv`.
    """
    path = Path(annotations)
    if not path.is_file():
        raise VideoQAError(f"annotation file {path} not found")
    if path.suffix.lower() in (".csv", ".tsv"):
        return "tgif_frameqa", _rows_frameqa(path)
    raw = _read_json(path)
    if not isinstance(raw, list) or not raw:
        raise VideoQAError(f"{path}: expected a non-empty JSON list of questions")
    first = raw[0] if isinstance(raw[0], dict) else {}
    if "video_name" in first:
        return "videochatgpt", _rows_videochatgpt(path, raw, answers)
    if "video_id" in first and "answer" in first:
        return "xu2017", _rows_xu2017(path, raw, _read_video_map(video_map))
    raise VideoQAError(f"{path}: unrecognised format (keys {', '.join(sorted(first))}); expected Video-LLaVA's "
                       "test_q.json [{video_name, question, question_id}] (+ test_a.json), MSVD/MSRVTT-QA's "
                       "*_qa.json [{video_id, question, answer, id}] or TGIF-QA's *_frameqa_question.csv")


def _find_video(videos: Path, names: list[str]) -> str | None:
    for name in names:
        for ext in VIDEO_EXTENSIONS:
            p = videos / f"{name}{ext}"
            if p.is_file():
                return str(p.resolve())
    return None


def prepare_video_qa(name: str, annotations: str, videos: str, answers: str | None = None,
                     limit: int | None = DEFAULT_LIMIT, video_map: str | None = None, out: str | None = None,
                     check_decode: bool = True) -> str:
    """Build `LMUData/<name>.tsv` from an official annotation file and the video folder.

    Args:
        name: TGIF_QA, MSVD_QA, MSRVTT_QA (Table 18's evaluation sets) or <name>_VAL (search validation sets).
        annotations: Video-LLaVA's `test_q.json` (GPT_Zero_Shot_QA/{TGIF,MSVD,MSRVTT}_Zero_Shot_QA/, with
            `test_a.json` beside it or --answers), MSVD-QA / MSRVTT-QA `*_qa.json`, or TGIF-QA
            `*_frameqa_question.csv` (`read_video_qa_annotations`).
        videos: the video folder (Video-LLaVA: MSVD `videos/`, MSRVTT `videos/all/`, TGIF `mp4/`); a row's
            video is `<videos>/<name><ext>`, ext in VIDEO_EXTENSIONS (Video-LLaVA's order).
        limit: keep the first `limit` questions in file order (default 1000, App. E.7); None or 0 = all.
        video_map: MSVD-QA's youtube_mapping.txt for `*_qa.json` files.
        check_decode: open every kept video (decord, as Video-LLaVA) and require at least one frame.

    Nothing is written unless every kept row has its video (and it decodes); the TSV is written whole.
    """
    from tqdm import tqdm

    if name not in VIDEO_QA_DATASETS:
        raise VideoQAError(f"--name must be one of {', '.join(VIDEO_QA_DATASETS)}, got {name!r}")
    if limit is not None and limit < 0:
        raise VideoQAError(f"--limit must be >= 0 (0 = all questions), got {limit}")
    vdir = Path(videos)
    if not vdir.is_dir():
        raise VideoQAError(f"video folder {vdir} not found")
    fmt, rows = read_video_qa_annotations(annotations, answers, video_map)
    if fmt == "tgif_frameqa" and not name.startswith("TGIF"):
        raise VideoQAError(f"{annotations} is a TGIF-QA FrameQA file, not {VIDEO_QA_DATASETS[name][0]}")
    rows = rows[:limit] if limit else rows
    out_rows, missing = [], []
    for i, r in enumerate(tqdm(rows, desc=f"{name}: videos", disable=len(rows) < 50)):
        path = _find_video(vdir, r["names"])
        if path is None:
            missing.append((i, r["names"][0]))
            continue
        if check_decode:
            try:
                if _frame_count(path) < 1:
                    raise ValueError("no frames")
            except Exception as exc:  # decord raises its own error types
                raise VideoQAError(f"{annotations} item {i}: video {path} does not decode ({type(exc).__name__}: "
                                   f"{exc})") from None
        row = {"index": i, "video": Path(path).stem, "video_path": path, "question": str(r["question"]),
               "answer": str(r["answer"]), "question_id": r["question_id"]}
        if "type" in r:
            row["type"] = r["type"]
        out_rows.append(row)
    if missing:
        first = {}
        for i, video in missing:
            first.setdefault(video, i)
        shown = "; ".join(f"{v} (item {i})" for v, i in list(first.items())[:3])
        gif = " (TGIF GIFs: use Video-LLaVA's mp4 conversions, TGIF_Zero_Shot_QA/mp4)" if fmt == "tgif_frameqa" else ""
        raise VideoQAError(f"{len(missing)} of {len(rows)} questions have no video in {vdir} ({len(first)} videos "
                           f"missing, tried {', '.join(VIDEO_EXTENSIONS)}), e.g. {shown}{gif}")
    if not out_rows:
        raise VideoQAError(f"{annotations} holds no questions")
    target = Path(out or osp.join(LMUDataRoot(), f"{name}.tsv"))
    tmp = target.with_name(target.name + ".tmp")
    pd.DataFrame(out_rows).to_csv(tmp, sep="\t", index=False)
    tmp.replace(target)  # never a half-written TSV under the dataset's name
    return str(target)


# ------------------------------------------------------------------------------------------ demo set
_DEMO_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220)}
DEMO_FRAMES, DEMO_SIZE, DEMO_FPS = 16, 224, 8


def demo_video_frames(kind: str, arg) -> list[np.ndarray]:
    """RGB frames (uint8, DEMO_SIZE^2) of one DOP_VideoDemo video, fully determined by (kind, arg)."""
    frames = []
    for t in range(DEMO_FRAMES):
        f = np.full((DEMO_SIZE, DEMO_SIZE, 3), 255, np.uint8)
        if kind == "colour":  # a square sliding left to right
            x = 10 + t * 10
            f[87:137, x:x + 50] = _DEMO_COLOURS[arg]
        elif kind == "direction":  # a black disc moving left or right
            x = 40 + t * 9 if arg == "right" else 184 - t * 9
            yy, xx = np.mgrid[:DEMO_SIZE, :DEMO_SIZE]
            f[(yy - 112) ** 2 + (xx - x) ** 2 <= 20 ** 2] = (0, 0, 0)
        elif kind == "count":  # `arg` blue squares, blinking every other frame
            if t % 2 == 0:
                for k in range(arg):
                    x = 16 + k * 52
                    f[92:132, x:x + 40] = _DEMO_COLOURS["blue"]
        else:
            raise ValueError(kind)
        frames.append(f)
    return frames


DEMO_SAMPLES = (
    ("colour", "red", "What color is the moving square?", "red"),
    ("colour", "green", "What color is the moving square?", "green"),
    ("colour", "blue", "What color is the moving square?", "blue"),
    ("direction", "left", "Does the ball move to the left or to the right?", "left"),
    ("direction", "right", "Does the ball move to the left or to the right?", "right"),
    ("count", 3, "How many squares are there?", "3"),
)


def write_demo_video(path: str, frames: list[np.ndarray]) -> None:
    """An mp4 (mpeg-4 part 2, OpenCV's bundled ffmpeg) of RGB frames, written under a temporary name first."""
    import cv2

    tmp = f"{path}.tmp.mp4"
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), DEMO_FPS, (DEMO_SIZE, DEMO_SIZE))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4 files here ({tmp}); DOP_VideoDemo needs opencv-python with ffmpeg")
    for f in frames:
        writer.write(f[:, :, ::-1].copy())  # OpenCV takes BGR
    writer.release()
    os.replace(tmp, path)


class DOPVideoDemoDataset(VideoQADataset):
    """`DOP_VideoDemo`: 6 generated mp4 videos (16 frames, 224 px) with exactly known answers (colour of a
    moving square, direction of a moving ball, number of squares), scored by exact match; no download, no
    judge. The videos and the TSV are written under the data root on first use (`LMUData/videos/DOP_VideoDemo/`,
    `LMUData/DOP_VideoDemo.tsv`)."""

    TYPE = "Video-VQA"

    def __init__(self, dataset="DOP_VideoDemo", pack=False, nframe=NFRAMES, fps=-1):
        super().__init__(dataset=dataset, pack=pack, nframe=nframe, fps=fps)

    @classmethod
    def supported_datasets(cls):
        return ["DOP_VideoDemo"]

    def prepare_dataset(self, dataset):
        root = Path(LMUDataRoot())
        vdir = root / "videos" / dataset
        vdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (kind, arg, question, answer) in enumerate(DEMO_SAMPLES):
            path = vdir / f"demo_{i}_{kind}.mp4"
            if not path.is_file():
                write_demo_video(str(path), demo_video_frames(kind, arg))
            rows.append({"index": i, "video": path.stem, "video_path": str(path), "question": question,
                         "answer": answer, "category": kind})
        tsv = root / f"{dataset}.tsv"
        frame = pd.DataFrame(rows)
        if not tsv.is_file() or not load(str(tsv)).astype(str).equals(frame.astype(str)):
            tmp = tsv.with_name(tsv.name + ".tmp")
            frame.to_csv(tmp, sep="\t", index=False)
            tmp.replace(tsv)
        self.data_path = str(tsv)
        return dict(root=str(vdir), data_file=str(tsv))

    def evaluate(self, eval_file, **judge_kwargs):
        """Exact match (case, surrounding blanks and a final full stop ignored): `_acc` with Overall and per
        category, in percent; no judge is called."""
        from .datasets import evaluate_exact_match

        return evaluate_exact_match(eval_file)
