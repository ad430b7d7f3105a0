"""Video QA datasets of Table 18 (vlmeval_dop/video_qa.py): building TGIF/MSVD/MSRVTT-QA from the official
annotation formats with generated videos, the Video-LLaVA judge through VLMEvalKit's build_judge against a
local OpenAI-compatible HTTP server (real round trips), hand-computed accuracy / score, malformed replies,
the missing-judge error, and the offline DOP_VideoDemo dataset."""
from __future__ import annotations

import ast
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

cv2 = pytest.importorskip("cv2")


# ------------------------------------------------------------------------------------------ helpers
def write_video(path, levels, size=64, fourcc="mp4v", fps=8):
    """A video whose frame t is uniformly grey at `levels[t]` (so sampled frames can be identified)."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (size, size))
    assert w.isOpened()
    for v in levels:
        w.write(np.full((size, size, 3), int(v), np.uint8))
    w.release()


class JudgeServer:
    """An OpenAI-compatible /chat/completions endpoint on 127.0.0.1 that judges like a strict grader:
    prediction == answer -> yes 5; answer inside prediction -> yes 4.8 (the official int() makes it 4);
    otherwise no 1. Prediction "MALFORMED": always a reply that is no dict; "FLAKY": a dict without
    'score' the first time, then yes 4. Every request is recorded."""

    def __init__(self):
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                    content = server.reply(body)
                out = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, body) -> str:
        user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        answer = re.search(r"Correct Answer: (.*)\n", user).group(1)
        pred = re.search(r"Predicted Answer: (.*)\n", user).group(1)
        n = self.seen[pred] = self.seen.get(pred, 0) + 1
        if pred == "MALFORMED":
            return "I think the prediction is correct."
        if pred == "FLAKY" and n == 1:
            return "{'pred': 'yes'}"
        if pred == "FLAKY" or pred.lower() == answer.lower():
            return "{'pred': 'yes', 'score': 5}" if pred != "FLAKY" else "{'pred': 'yes', 'score': 4}"
        if answer.lower() in pred.lower():
            return "{'pred': 'yes', 'score': 4.8}"
        return "{'pred': 'no', 'score': 1}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    s = JudgeServer()
    yield s
    s.close()


# the tiny set: (video, question, answer, prediction); judged by hand with the server's rules above
SAMPLES = [
    ("clipA_0_5", "what is the man doing?", "dancing", "dancing"),      # yes, 5
    ("clipA_0_5", "what animal is shown?", "cat", "a black cat"),       # yes, int(4.8) = 4
    ("clipB_3_9", "what color is the car?", "red", "blue"),             # no, 1
    ("clipB_3_9", "how many people are there?", "two", "FLAKY"),        # malformed once, then yes, 4
    ("clipC_1_2", "what is running?", "dog", "MALFORMED"),              # failed after 1 + 3 calls: counts no, 0
]
HAND = {"acc": 60.0, "score": 14 / 5, "acc_judged": 75.0, "score_judged": 14 / 4,
        "n": 5, "yes": 3, "no": 1, "judge_failed": 1}


@pytest.fixture(scope="module")
def msvd_files(tmp_path_factory):
    """Video-LLaVA's GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA layout: test_q.json, test_a.json, videos/*.avi."""
    d = tmp_path_factory.mktemp("MSVD_Zero_Shot_QA")
    (d / "videos").mkdir()
    for k, name in enumerate(["clipA_0_5", "clipB_3_9", "clipC_1_2"]):
        write_video(d / "videos" / f"{name}.avi", [15 * t + k for t in range(12)], fourcc="MJPG")
    qs = [{"video_name": v, "question": q, "question_id": i} for i, (v, q, _, _) in enumerate(SAMPLES)]
    ans = [{"answer": a, "question_id": i} for i, (_, _, a, _) in enumerate(SAMPLES)]
    (d / "test_q.json").write_text(json.dumps(qs))
    (d / "test_a.json").write_text(json.dumps(ans))
    return d


def _prepare(name, ann, videos, *extra):
    from vlmeval_dop.datasets import main

    return main(["prepare-video-qa", "--name", name, "--annotations", str(ann), "--videos", str(videos), *extra])


def _predictions(tmp_path, ds, preds):
    frame = ds.data.copy()
    frame["prediction"] = preds
    path = tmp_path / f"m_{ds.dataset_name}.xlsx"
    frame.to_excel(path, index=False)
    return path


def _judge_kwargs(name, type_, *argv):
    """The judge kwargs VLMEvalKit's run.py gives a dataset for these command-line flags."""
    import sys

    import vlmeval.run as vrun

    old = list(sys.argv)
    try:
        sys.argv = ["run.py", "--data", name, "--model", "x", *argv]
        args = vrun.parse_args()
    finally:
        sys.argv[:] = old
    return vrun.get_judge_kwargs(name, type_, args)


# ------------------------------------------------------------------------------------------ the judge
def test_parse_judge_reply_follows_the_official_parsing():
    from vlmeval_dop.video_qa import parse_judge_reply

    assert parse_judge_reply("{'pred': 'yes', 'score': 4}") == ("yes", 4)
    assert parse_judge_reply(" {'pred': 'No', 'score': 0} ") == ("no", 0)
    assert parse_judge_reply("{'pred': 'yes', 'score': 4.8}") == ("yes", 4)  # int(), as eval_video_qa.py
    assert parse_judge_reply("{'pred': 'yes', 'score': '3'}") == ("yes", 3)
    for bad in ("yes, 4", "{'pred': 'yes'}", "{'score': 3}", "{'pred': 'maybe', 'score': 2}",
                "{'pred': 'yes', 'score': '4.5'}", "```python\n{'pred': 'yes', 'score': 4}\n```", "", None):
        assert parse_judge_reply(bad) is None, bad


def test_judge_prompt_is_video_llavas():
    from vlmeval_dop.video_qa import JUDGE_MODEL, JUDGE_SYSTEM_PROMPT, judge_prompt

    text = judge_prompt("what is it?", "a cat", "cat")
    assert text.startswith("Please evaluate the following video-based question-answer pair:\n\nQuestion: what is "
                           "it?\nCorrect Answer: a cat\nPredicted Answer: cat\n\n")
    assert text.endswith("For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.")
    assert "INTEGER, not STRING.DO NOT PROVIDE" in text  # the official string has no space there
    assert JUDGE_SYSTEM_PROMPT.startswith("You are an intelligent chatbot") and JUDGE_MODEL == "gpt-3.5-turbo"


def test_scores_over_http_hand_computed(lmu_root, msvd_files, judge_server, tmp_path, monkeypatch):
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.datasets import register_datasets
    from vlmeval_dop.video_qa import JUDGE_SYSTEM_PROMPT, PARSE_RETRIES, judge_prompt

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos") == 0
    register_datasets()
    ds = build_dataset("MSVD_QA")
    pred = _predictions(tmp_path, ds, [s[3] for s in SAMPLES])
    kw = _judge_kwargs("MSVD_QA", ds.TYPE, "--judge-base-url", judge_server.url, "--judge-key", "sk-local",
                       "--judge-api-nproc", "2", "--judge-retry", "2")
    assert "model" not in kw  # VLMEvalKit names no judge for this type: the dataset's default is used

    ret = ds.evaluate(str(pred), **kw)
    for k, v in HAND.items():
        assert ret[k] == pytest.approx(v), k
    assert ret["judge"] == "gpt-3.5-turbo"
    score_file = tmp_path / "m_MSVD_QA_score.json"
    assert json.loads(score_file.read_text())["acc"] == pytest.approx(60.0)
    per = pd.read_excel(tmp_path / "m_MSVD_QA_gpt-3.5-turbo_results.xlsx")
    assert list(per["judge_verdict"]) == ["yes", "yes", "no", "yes", "failed"]
    assert list(per["judge_score"]) == [5, 4, 1, 4, 0]
    assert list(per["judge_calls"]) == [1, 1, 1, 2, 1 + PARSE_RETRIES]

    reqs = judge_server.requests
    assert len(reqs) == 3 + 2 + 1 + PARSE_RETRIES
    r0 = reqs[0]
    assert r0["path"] == "/v1/chat/completions" and r0["auth"] == "Bearer sk-local"
    assert r0["model"] == "gpt-3.5-turbo" and r0["temperature"] == 1.0
    assert r0["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    users = {r["messages"][1]["content"] for r in reqs}
    assert users == {judge_prompt(q, a, p) for _, q, a, p in SAMPLES}

    # evaluating again asks only the failed sample again (the cache keeps the judged ones)
    judge_server.requests.clear()
    ret2 = ds.evaluate(str(pred), **kw)
    assert len(judge_server.requests) == 1 + PARSE_RETRIES
    assert ret2["acc"] == pytest.approx(60.0) and ret2["judge_failed"] == 1

    # a changed prediction (the predictions were made again) is judged again; the others stay cached
    changed = [s[3] for s in SAMPLES]
    changed[0] = SAMPLES[2][3]
    pred = _predictions(tmp_path, ds, changed)
    judge_server.requests.clear()
    ds.evaluate(str(pred), **kw)
    asked = {r["messages"][1]["content"] for r in judge_server.requests}
    assert judge_prompt(SAMPLES[0][1], SAMPLES[0][2], changed[0]) in asked
    assert judge_prompt(SAMPLES[1][1], SAMPLES[1][2], SAMPLES[1][3]) not in asked


def test_judge_resume_after_a_crash_keeps_finished_judgements(lmu_root, msvd_files, judge_server, tmp_path,
                                                              monkeypatch):
    """A judge run that crashes mid-way (nproc 2) keeps what it judged; the rerun asks only the rest, also when
    it changes settings that do not change a verdict (--judge-timeout, --judge-retry, --verbose: how requests
    are sent), or names the same endpoint through OPENAI_API_BASE instead of --judge-base-url."""
    from vlmeval.dataset import build_dataset

    import vlmeval_dop.video_qa as vq
    from vlmeval_dop.datasets import register_datasets

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos") == 0
    register_datasets()
    ds = build_dataset("MSVD_QA")
    preds = [s[3] for s in SAMPLES[:3]] + ["two", "dog"]  # all five judged in one call each
    pred = _predictions(tmp_path, ds, preds)
    real = vq.judge_sample

    def crashing(judge, question, answer, prediction, **kw):
        if prediction == "dog":
            raise KeyboardInterrupt  # the run dies while judging this sample
        return real(judge, question, answer, prediction, **kw)

    monkeypatch.setattr(vq, "judge_sample", crashing)
    kw = _judge_kwargs("MSVD_QA", ds.TYPE, "--judge-base-url", judge_server.url, "--judge-key", "sk-local",
                       "--judge-api-nproc", "2", "--judge-timeout", "60")
    with pytest.raises(KeyboardInterrupt):
        ds.evaluate(str(pred), **kw)
    monkeypatch.setattr(vq, "judge_sample", real)
    saved = pd.read_pickle(tmp_path / "m_MSVD_QA_gpt-3.5-turbo_tmp.pkl")
    done = len(saved)
    assert 1 <= done <= 4 and all(v["verdict"] in ("yes", "no") for v in saved.values())
    judge_server.requests.clear()
    monkeypatch.setenv("OPENAI_API_BASE", f"{judge_server.url}/chat/completions")
    kw = _judge_kwargs("MSVD_QA", ds.TYPE, "--judge-key", "sk-local", "--judge-api-nproc", "1",
                       "--judge-timeout", "120", "--judge-retry", "7", "--verbose")
    ret = ds.evaluate(str(pred), **kw)
    assert len(judge_server.requests) == 5 - done  # only the samples the crashed run had not saved
    assert (ret["yes"], ret["no"], ret["judge_failed"]) == (4, 1, 0)


def test_judge_crash_keeps_every_judgement_it_paid_for(lmu_root, msvd_files, judge_server, tmp_path, monkeypatch):
    """A crash early in a judge run at nproc 2 (Ctrl-C, or an error escaping a worker) keeps every judgement the
    endpoint returned (each reply is saved once it is back; VLMEvalKit's track_progress_rich kept running the
    queued calls and dropped them all), so the rerun asks only the samples no reply was kept for."""
    from vlmeval.dataset import build_dataset

    import vlmeval_dop.video_qa as vq
    from vlmeval_dop.datasets import register_datasets

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos") == 0
    register_datasets()
    ds = build_dataset("MSVD_QA")
    pred = _predictions(tmp_path, ds, ["dancing", "CRASH", "blue", "two", "dog"])  # judged in one call each
    real = vq.judge_sample

    def crashing(judge, question, answer, prediction, **kw):
        if prediction == "CRASH":
            raise KeyboardInterrupt
        return real(judge, question, answer, prediction, **kw)

    monkeypatch.setattr(vq, "judge_sample", crashing)
    kw = _judge_kwargs("MSVD_QA", ds.TYPE, "--judge-base-url", judge_server.url, "--judge-key", "sk-local",
                       "--judge-api-nproc", "2")
    with pytest.raises(KeyboardInterrupt):
        ds.evaluate(str(pred), **kw)
    monkeypatch.setattr(vq, "judge_sample", real)
    saved = pd.read_pickle(tmp_path / "m_MSVD_QA_gpt-3.5-turbo_tmp.pkl")
    assert len(judge_server.requests) == len(saved)  # every reply that came back was kept
    asked_before = len(saved)
    judge_server.requests.clear()
    ret = ds.evaluate(str(pred), **kw)
    assert len(judge_server.requests) == 5 - asked_before
    assert (ret["yes"], ret["no"], ret["judge_failed"]) == (3, 2, 0)


def test_judge_from_vlmevalkit_env_and_named_model(lmu_root, msvd_files, judge_server, tmp_path, monkeypatch):
    """OPENAI_API_KEY / OPENAI_API_BASE (VLMEvalKit's .env keys) and --judge pick the endpoint and model."""
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.datasets import register_datasets

    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos", "--limit", "3") == 0
    register_datasets()
    ds = build_dataset("MSVD_QA")
    assert len(ds) == 3  # the first 3 questions in file order
    pred = _predictions(tmp_path, ds, ["dancing", "a black cat", "blue"])  # yes 5, yes 4, no 1
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_API_BASE", f"{judge_server.url}/chat/completions")
    kw = _judge_kwargs("MSVD_QA", ds.TYPE, "--judge", "gpt-3.5-turbo-0125", "--judge-args", '{"temperature": 0}')
    ret = ds.evaluate(str(pred), **kw)
    assert (ret["acc"], ret["score"], ret["judge"]) == (pytest.approx(200 / 3), pytest.approx(10 / 3),
                                                         "gpt-3.5-turbo-0125")
    assert {r["model"] for r in judge_server.requests} == {"gpt-3.5-turbo-0125"}
    assert {r["temperature"] for r in judge_server.requests} == {0}
    assert {r["auth"] for r in judge_server.requests} == {"Bearer sk-env"}


def test_no_judge_is_a_clear_error_and_writes_nothing(lmu_root, msvd_files, tmp_path, monkeypatch):
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.datasets import register_datasets
    from vlmeval_dop.video_qa import JudgeNotConfiguredError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos") == 0
    register_datasets()
    ds = build_dataset("MSVD_QA")
    pred = _predictions(tmp_path, ds, [s[3] for s in SAMPLES])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(JudgeNotConfiguredError, match="no judge configured.*OPENAI_API_KEY.*--judge-key"):
        ds.evaluate(str(pred), **_judge_kwargs("MSVD_QA", ds.TYPE))
    with pytest.raises(JudgeNotConfiguredError, match="exact_matching"):
        ds.evaluate(str(pred), model="exact_matching", key="sk-x")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------ building
def test_prepare_videochatgpt_format_and_prompts(lmu_root, msvd_files):
    from vlmeval.dataset import DATASET_TYPE, build_dataset

    from vlmeval_dop.datasets import register_datasets, resolve_dataset_name
    from vlmeval_dop.video_qa import video_frame_indices

    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos", "--limit", "4") == 0
    tsv = pd.read_csv(lmu_root / "MSVD_QA.tsv", sep="\t")
    assert list(tsv["question"]) == [s[1] for s in SAMPLES[:4]] and list(tsv["answer"]) == [s[2] for s in SAMPLES[:4]]
    assert list(tsv["video_path"]) == [str(msvd_files / "videos" / f"{s[0]}.avi") for s in SAMPLES[:4]]
    assert list(tsv["question_id"]) == [0, 1, 2, 3] and list(tsv["index"]) == [0, 1, 2, 3]
    register_datasets()
    assert resolve_dataset_name("MSVD-QA") == "MSVD_QA" and DATASET_TYPE("MSVD_QA") == "Video-VQA"
    ds = build_dataset("MSVD_QA")
    assert ds.MODALITY == "VIDEO" and ds.nframe == 8
    assert ds.build_prompt(2, video_llm=True) == [{"type": "video", "value": tsv["video_path"][2]},
                                                   {"type": "text", "value": "what color is the car?"}]
    # image wrappers get Video-LLaVA's 8 frames: np.linspace(0, 11, 8, dtype=int) of the 12-frame clip B
    assert video_frame_indices(12) == [0, 1, 3, 4, 6, 7, 9, 11]
    msg = ds.build_prompt(ds.data.iloc[2], video_llm=False)
    assert [m["type"] for m in msg] == ["image"] * 8 + ["text"]
    from PIL import Image

    grey = [float(np.asarray(Image.open(m["value"])).mean()) for m in msg[:8]]
    assert np.allclose(grey, [15 * t + 1 for t in video_frame_indices(12)], atol=3), grey


def test_prepare_official_formats(lmu_root, tmp_path):
    """MSVD-QA / MSRVTT-QA *_qa.json (Xu et al. 2017, + youtube_mapping.txt) and TGIF-QA FrameQA csv."""
    from vlmeval_dop.video_qa import prepare_video_qa

    vids = tmp_path / "v"
    vids.mkdir()
    for name in ("-4wsuPCjDBc_5_15", "video7010", "tumblr_abc_250"):
        write_video(vids / f"{name}.mp4", [40, 80, 120])
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nzzz_1_2 vid2\n")
    (tmp_path / "val_qa.json").write_text(json.dumps(
        [{"answer": "dog", "id": 30934, "question": "what is playing?", "video_id": 1}]))
    out = prepare_video_qa("MSVD_QA_VAL", str(tmp_path / "val_qa.json"), str(vids),
                           video_map=str(tmp_path / "youtube_mapping.txt"))
    row = pd.read_csv(out, sep="\t").iloc[0]
    assert (row["video"], row["question_id"], row["answer"]) == ("-4wsuPCjDBc_5_15", 30934, "dog")
    (tmp_path / "test_qa.json").write_text(json.dumps(
        [{"answer": "man", "category_id": 0, "id": 158581, "question": "who is talking?", "video_id": 7010}]))
    row = pd.read_csv(prepare_video_qa("MSRVTT_QA", str(tmp_path / "test_qa.json"), str(vids)), sep="\t").iloc[0]
    assert (row["video"], row["type"], row["question"]) == ("video7010", 0, "who is talking?")
    (tmp_path / "Test_frameqa_question.csv").write_text(
        "gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription\n"
        "tumblr_abc_250\twhat is the color of the shirt ?\tblack\t2\tFRAMEQA4460\t87751\ta man in a black shirt\n")
    row = pd.read_csv(prepare_video_qa("TGIF_QA", str(tmp_path / "Test_frameqa_question.csv"), str(vids)),
                      sep="\t").iloc[0]
    assert (row["video"], row["answer"], row["question_id"], row["type"]) == ("tumblr_abc_250", "black",
                                                                            "FRAMEQA4460", 2)


def test_prepare_errors_are_clear_and_write_nothing(lmu_root, msvd_files, tmp_path, capsys):
    from vlmeval_dop.video_qa import VideoQAError, prepare_video_qa

    out = tmp_path / "X.tsv"
    q, videos = msvd_files / "test_q.json", msvd_files / "videos"
    with pytest.raises(VideoQAError, match="--name must be one of TGIF_QA, MSVD_QA"):
        prepare_video_qa("MSVD", str(q), str(videos), out=str(out))
    with pytest.raises(VideoQAError, match=r"5 of 5 questions have no video in .*empty \(3 videos missing.*e\.g\. clipA_0_5 \(item 0\); "
                       r"clipB_3_9 \(item 2\)"):
        (tmp_path / "empty").mkdir()
        prepare_video_qa("MSVD_QA", str(q), str(tmp_path / "empty"), out=str(out))
    bad_a = tmp_path / "a.json"
    bad_a.write_text(json.dumps([{"answer": "x", "question_id": 9}] + [{"answer": "y"}] * 4))
    with pytest.raises(VideoQAError, match=r"item 0: question_id 0 but a.json item 0 has question_id 9"):
        prepare_video_qa("MSVD_QA", str(q), str(videos), answers=str(bad_a), out=str(out))
    bad_a.write_text(json.dumps([{"answer": "x"}]))
    with pytest.raises(VideoQAError, match="has 5 questions but .*a.json has 1 answers"):
        prepare_video_qa("MSVD_QA", str(q), str(videos), answers=str(bad_a), out=str(out))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"vid": 1, "q": "?"}]))
    with pytest.raises(VideoQAError, match="unrecognised format"):
        prepare_video_qa("MSVD_QA", str(odd), str(videos), out=str(out))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("clipA_0_5", "clipB_3_9", "clipC_1_2"):
        (broken / f"{name}.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoQAError, match=r"item 0: video .*clipA_0_5.mp4 does not decode"):
        prepare_video_qa("MSVD_QA", str(q), str(broken), out=str(out))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    # the command line: one error line, exit 2
    assert _prepare("MSVD_QA", q, tmp_path / "nowhere") == 2
    assert capsys.readouterr().err.strip() == f"prepare-video-qa: error: video folder {tmp_path / 'nowhere'} not found"


def test_unprepared_dataset_names_the_command(tmp_path, monkeypatch):
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.datasets import register_datasets

    register_datasets()
    monkeypatch.setenv("LMUData", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare-video-qa --name TGIF_QA --annotations"):
        build_dataset("TGIF_QA")


# ------------------------------------------------------------------------------------------ demo
def test_video_demo_is_generated_and_scored_by_exact_match(lmu_root, tmp_path):
    import decord
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.datasets import register_datasets
    from vlmeval_dop.video_qa import DEMO_SAMPLES, demo_video_frames

    register_datasets()
    ds = build_dataset("DOP_VideoDemo")
    assert len(ds) == len(DEMO_SAMPLES) == 6 and ds.MODALITY == "VIDEO"
    first = ds.build_prompt(0, video_llm=True)
    assert first[1] == {"type": "text", "value": "What color is the moving square?"}
    vr = decord.VideoReader(first[0]["value"])
    assert len(vr) == 16
    # decoded frames are the generated ones (up to the mp4 codec's loss)
    err = np.abs(vr[5].asnumpy().astype(float) - demo_video_frames("colour", "red")[5].astype(float)).mean()
    assert err < 4, err
    assert build_dataset("DOP_VideoDemo").data.equals(ds.data)  # deterministic, reused
    pred = _predictions(tmp_path, ds, ["Red.", "green", "red", "left", "up", "3"])
    ret = ds.evaluate(str(pred))
    acc = ret.iloc[0].to_dict() if isinstance(ret, pd.DataFrame) else ret
    assert acc["Overall"] == pytest.approx(100 * 4 / 6)
    assert (acc["colour"], acc["direction"], acc["count"]) == (pytest.approx(200 / 3), 50.0, 100.0)


# ------------------------------------------------------------------------------------------ Table 18
def test_table18_plan_lists_every_cell_with_its_commands(tmp_path, monkeypatch, capsys):
    from reproduce import run as rrun

    monkeypatch.setenv("LMUData", str(tmp_path))
    cells = rrun.plan_table(18, tmp_path / "outputs")
    assert [(c.row, c.benchmark, c.dataset) for c in cells][:3] == [
        ("videollava_7b", "TGIF-QA", "TGIF_QA"), ("videollava_7b", "MSVD-QA", "MSVD_QA"),
        ("videollava_7b", "MSRVTT-QA", "MSRVTT_QA")]
    assert len(cells) == 15 and all(c.status == "blocked" and c.data == c.dataset for c in cells)
    dop = {c.entry for c in cells if "dopv" in c.row}
    assert dop == {"videollava_7b_dopv16_val_msvd", "videollava_7b_dopv11_val_msvd"}
    c = next(c for c in cells if c.row == "videollava_7b_dopv11")
    assert c.reason == ("install its policy first: build MSVD_QA_VAL first (data line below), then vlmeval-dop search "
                        "--model videollava_7b --reducer vispruner --data MSVD_QA_VAL --samples 100 --seed 42 "
                        "--budget 0.11 --install val_msvd")
    assert rrun.main(["--table", "18", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("table 18: 15 cells: 0 done, 0 to run, 15 blocked")
    for d in ("TGIF_QA", "MSVD_QA", "MSRVTT_QA", "MSVD_QA_VAL"):
        assert f"  data  {d}: {tmp_path / (d + '.tsv')} missing: python -m vlmeval_dop.datasets prepare-video-qa " \
               f"--name {d} --annotations " in out
    assert "--annotations <GPT_Zero_Shot_QA>/MSRVTT_Zero_Shot_QA/test_q.json --videos " \
           "<GPT_Zero_Shot_QA>/MSRVTT_Zero_Shot_QA/videos/all" in out
    assert "reproduce/aggregate.py --work-dir <work dir> --paper-table 18" in out and "--judge-key" in out

    # once the datasets are built, only what the entries need is left (and finished cells are found)
    for d in ("TGIF_QA", "MSVD_QA", "MSRVTT_QA", "MSVD_QA_VAL"):
        (tmp_path / f"{d}.tsv").write_text("index\n")
    work = tmp_path / "outputs"
    (work / "videollava_7b").mkdir(parents=True)
    (work / "videollava_7b" / "videollava_7b_MSVD_QA_score.json").write_text(json.dumps({"acc": 70.0, "score": 3.9}))
    cells = rrun.plan_table(18, work)
    assert not any(c.data for c in cells)
    c = next(c for c in cells if c.row == "videollava_7b_dopv16")
    assert c.reason.startswith("install its policy first: vlmeval-dop search --model videollava_7b --reducer "
                               "vispruner --data MSVD_QA_VAL")
    base = {c.benchmark: c for c in cells if c.row == "videollava_7b"}
    if base["MSVD-QA"].reason == "":  # the Video-LLaVA entry is registered (wt/video_family)
        assert base["MSVD-QA"].status == "done" and base["TGIF-QA"].status == "todo"
    else:
        assert base["MSVD-QA"].reason.startswith("no entry 'videollava_7b'")


def test_table18_aggregate_beside_the_paper(tmp_path, capsys):
    from reproduce import aggregate

    vals = {  # (acc, score) per entry and dataset
        "videollava_7b": {"TGIF_QA": (20.0, 2.5), "MSVD_QA": (70.0, 4.0), "MSRVTT_QA": (57.0, 3.46)},
        "videollava_7b_dopv11_val_msvd": {"TGIF_QA": (15.0, 2.3), "MSVD_QA": (66.0, 3.8), "MSRVTT_QA": (54.0, 3.4)},
        "videollava_7b_vispruner11": {"TGIF_QA": (14.0, 2.35)},
    }
    for entry, per in vals.items():
        (tmp_path / entry).mkdir()
        for d, (acc, score) in per.items():
            failed = 3 if (entry, d) == ("videollava_7b", "MSVD_QA") else 0
            (tmp_path / entry / f"{entry}_{d}_score.json").write_text(json.dumps(
                {"acc": acc, "score": score, "acc_judged": 0.0, "n": 1000, "judge": "gpt-3.5-turbo",
                 "judge_failed": failed}))
    scores = aggregate.collect_scores(tmp_path, benchmarks=["TGIF-QA", "MSVD-QA", "MSRVTT-QA"])
    err = capsys.readouterr().err  # judgements that failed are counted, and said so where the table is made
    assert "videollava_7b_MSVD_QA_score.json: the judge gave no usable reply for 3 sample(s)" in err
    assert err.count("no usable reply") == 1
    table, notes = aggregate.video_table(scores)
    assert list(table.index) == ["videollava_7b", "videollava_7b (paper)", "videollava_7b_vispruner11",
                                 "videollava_7b_vispruner11 (paper)", "videollava_7b_dopv11_val_msvd",
                                 "videollava_7b_dopv11 (paper)"]
    assert table.loc["videollava_7b", "avg_acc"] == pytest.approx((20 + 70 + 57) / 3)
    assert table.loc["videollava_7b", "avg_score"] == pytest.approx((2.5 + 4.0 + 3.46) / 3)
    assert table.loc["videollava_7b_dopv11 (paper)"].tolist() == [14.6, 2.36, 65.8, 3.80, 54.4, 3.42, 44.9, 3.19]
    assert pd.isna(table.loc["videollava_7b_vispruner11", "avg_acc"])
    assert any("vispruner11" in n for n in notes) and any("dopv11_val_msvd is Table 18's row" in n for n in notes)

    assert aggregate.main(["--work-dir", str(tmp_path), "--paper-table", "18", "--out", str(tmp_path / "t18")]) == 0
    out = capsys.readouterr().out
    assert "| videollava_7b | 20.0 | 2.50 | 70.0 | 4.00 | 57.0 | 3.46 | 49.0 | 3.32 |" in out
    assert "| videollava_7b (paper) | 19.8 | 2.53 | 70.5 | 3.93 | 57.5 | 3.50 | 49.3 | 3.32 |" in out
    assert pd.read_csv(tmp_path / "t18.csv")["avg_acc"][0] == pytest.approx(49.0)
    assert aggregate.main(["--work-dir", str(tmp_path), "--paper-table", "18", "--base", "videollava_7b"]) == 2
    assert "drop --base" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end
def _run(run_py, monkeypatch, *argv):
    """`python run.py ARGV` in this process (run.py rewrites sys.argv for VLMEvalKit's parser: restored after)."""
    import sys

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_py.main(list(argv))


def test_msvd_end_to_end_through_vlmevalkit_and_the_judge(lmu_root, msvd_files, run_py, judge_server, tmp_path,
                                                          monkeypatch):
    """run.py (VLMEvalKit's video inference loop) on the tiny Video-LLaVA, then its evaluation step asks the local
    judge over HTTP; the score file equals the server's rule applied to the written predictions."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert _prepare("MSVD_QA", msvd_files / "test_q.json", msvd_files / "videos") == 0
    entry = "tiny_videollava"
    _run(run_py, monkeypatch, "--model", entry, "--data", "MSVD-QA", "--work-dir", str(tmp_path),
         "--judge-base-url", judge_server.url, "--judge-key", "sk-local")
    d = tmp_path / entry
    preds = pd.read_excel(d / f"{entry}_MSVD_QA.xlsx")
    assert len(preds) == 5 and preds["prediction"].notna().all()
    from vlmeval_dop.video_qa import judge_prompt

    verdicts = [ast.literal_eval(judge_server.reply({"messages": [{"role": "user", "content": judge_prompt(q, a, p)}]}))
                for q, a, p in zip(preds["question"], preds["answer"], preds["prediction"].astype(str))]
    got = json.loads((d / f"{entry}_MSVD_QA_score.json").read_text())
    assert got["n"] == 5 and got["judge_failed"] == 0 and got["judge"] == "gpt-3.5-turbo"
    assert got["acc"] == pytest.approx(100 * sum(v["pred"] == "yes" for v in verdicts) / 5)
    assert got["score"] == pytest.approx(sum(int(v["score"]) for v in verdicts) / 5)
    assert len(judge_server.requests) == 5


def test_video_demo_end_to_end_through_run_py(lmu_root, run_py, tmp_path, monkeypatch):
    """`python run.py --model tiny_videollava_dopv --data DOP_VideoDemo`: generated videos, VLMEvalKit's video
    inference loop on the DOP_V-pruned tiny Video-LLaVA, exact-match score file; no download, no judge."""
    entry = "tiny_videollava_dopv"
    _run(run_py, monkeypatch, "--model", entry, "--data", "DOP_VideoDemo", "--work-dir", str(tmp_path))
    d = tmp_path / entry
    preds = pd.read_excel(d / f"{entry}_DOP_VideoDemo.xlsx")
    assert len(preds) == 6 and preds["prediction"].notna().all()
    acc = pd.read_csv(d / f"{entry}_DOP_VideoDemo_acc.csv")
    from vlmeval_dop.datasets import normalize_exact

    hits = [normalize_exact(p) == normalize_exact(a) for p, a in zip(preds["prediction"].astype(str), preds["answer"])]
    assert float(acc["Overall"][0]) == pytest.approx(100 * sum(hits) / 6)



def test_frames_for_image_models_follow_the_video_file(lmu_root, tmp_path):
    """Frames saved for wrappers that take images are Video-LLaVA's linspace frames of *this* file: a dataset
    rebuilt from another video of the same name gets new frames, not the cached ones."""
    from PIL import Image

    from vlmeval_dop.datasets import register_datasets
    from vlmeval_dop.video_qa import VideoQADataset

    d = tmp_path / "MSVD_Zero_Shot_QA"
    (d / "videos").mkdir(parents=True)
    write_video(d / "videos" / "clipZ.avi", [10 * t for t in range(12)], fourcc="MJPG")
    (d / "test_q.json").write_text(json.dumps([{"video_name": "clipZ", "question": "q?", "question_id": 0}]))
    (d / "test_a.json").write_text(json.dumps([{"answer": "a", "question_id": 0}]))
    assert _prepare("MSVD_QA", d / "test_q.json", d / "videos") == 0
    register_datasets()
    ds = VideoQADataset("MSVD_QA")

    def levels():
        return [int(np.asarray(Image.open(p)).mean().round()) for p in ds.frame_files(ds.data.iloc[0])]

    first = levels()  # frame t is grey 10 t: linspace(0, 11, 8) = 0, 1, 3, 4, 6, 7, 9, 11
    assert all(abs(a - b) <= 2 for a, b in zip(first, [0, 10, 30, 40, 60, 70, 90, 110]))
    write_video(d / "videos" / "clipZ.avi", [200 - 10 * t for t in range(12)], fourcc="MJPG")
    second = levels()
    assert all(abs(a - b) <= 2 for a, b in zip(second, [200, 190, 170, 160, 140, 130, 110, 90]))
