"""The DOP policy search on video inputs (issue 14): `vlmeval-dop search --model <video model> --reducer vispruner
--data <video validation set> --install TAG` on the tiny Video-LLaVA with a tiny generated video validation set
(a `MSVD_QA_VAL`-format TSV of mp4 files written here), then the installed entry answers a video message."""
from __future__ import annotations

import os
import shutil

import av
import pandas as pd
import pytest

from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.tiny import tiny_video

QUESTIONS = ["What is the man doing?", "What color is the car?", "How many people are there?", "Where is the dog?"]


def write_mp4(path, seed: int, frames: int = 24, size=(160, 120), fps: int = 8) -> None:
    """A tiny_video() morph encoded with PyAV (what VLMEvalKit's VideoLLaVA_HF decodes)."""
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for f in tiny_video(seed, frames=frames, size=size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


@pytest.fixture()
def video_val(tmp_path):
    """LMUData/MSVD_QA_VAL.tsv (the search's video validation set) with 4 generated mp4 videos."""
    root = tmp_path / "LMUData"
    (root / "videos").mkdir(parents=True)
    rows = []
    for i, q in enumerate(QUESTIONS):
        path = root / "videos" / f"vid{i}.mp4"
        write_mp4(path, seed=i)
        rows.append(dict(index=i, video=f"vid{i}", video_path=str(path), question=q, answer="yes", question_id=i))
    pd.DataFrame(rows).to_csv(root / "MSVD_QA_VAL.tsv", sep="\t", index=False)
    old = os.environ.get("LMUData")
    os.environ["LMUData"] = str(root)  # VLMEvalKit's own data root setting
    yield root
    if old is None:
        os.environ.pop("LMUData", None)
    else:
        os.environ["LMUData"] = old


def test_search_on_video_installs_a_runnable_entry(tmp_path, video_val):
    from vlmeval_dop.models_config import CONFIG_DIR
    from vlmeval_dop.registry import load_entries
    from vlmeval_dop.search.run import run_search, validation_items

    val = validation_items("tiny_videollava", "MSVD_QA_VAL", 3, 1)
    vid = val.model.config.video_token_id
    assert all(m[0]["type"] == "video" for m in val.messages)  # the video file, as VLMEvalKit hands it over
    assert all(int((inputs["input_ids"] == vid).sum()) == 520 and "pixel_values_videos" in inputs for _, inputs in val.items)

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    summary = run_search("tiny_videollava", "MSVD_QA_VAL", "vispruner", [0.5], 3, 1, tmp_path / "p",
                         install="vt", config_dir=cfg)  # fmt: skip
    (budget, name), = summary["installed"].items()
    assert name == "tiny_videollava_dopv50_vt"
    entry = load_entries(cfg)[name]
    policy = DOPPolicy.from_dict(summary["results"][budget]["policy"])
    assert entry.policy == policy and entry.reducer == "vispruner" and entry.runnable
    assert policy.n_v is not None and policy.n_v <= 520 and not policy.is_full(4)
    assert not any(n.endswith("_vt") for n in load_entries())  # the repository's eval_configs untouched

    # the installed entry answers a video message, pruned as installed (load_entry reads the repository's
    # eval_configs: the entry of the copy is built the same way)
    from vlmeval_dop.models import wrapper_class

    e = load_entries(cfg)[name]
    wrapper = wrapper_class(e.model.wrapper)(tiny=e.model.tiny, entry=name, policy=e.policy, reducer=e.reducer,
                                             **e.model.args)  # fmt: skip
    answer = wrapper.generate(val.messages[0], dataset="MSVD_QA_VAL")
    assert isinstance(answer, str)
    n_text = int(val.items[0][1]["input_ids"].shape[1]) - 520
    assert wrapper.last_visual_tokens == 520 and wrapper.last_layer_tokens[0][0] == n_text + policy.n_v


def test_image_model_on_a_video_set_is_refused(video_val):
    from vlmeval_dop.checks import UsageError
    from vlmeval_dop.search.run import validation_items

    with pytest.raises(UsageError, match="video dataset"):
        validation_items("tiny_llava15", "MSVD_QA_VAL", 2, 1)
