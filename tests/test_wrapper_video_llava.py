"""The Video-LLaVA VLMEvalKit wrapper (vlmeval_dop/models/video_llava.py) and its tiny checkpoint.

Video messages are VLMEvalKit's (`[video file, question]`, what a video dataset gives a `VIDEO_LLM` model). The
inputs are checked against hand-written references of both protocols: `official` (default) = Video-LLaVA's own
video-QA evaluation (llava_v1 conversation with its system prompt, decord frames at `np.linspace(0, total - 1, 8)`),
`vlmevalkit` = VLMEvalKit's `VideoLLaVA_HF` (PyAV frames at `np.arange(0, total, total / 8)`,
`USER: <video>\\n<q> ASSISTANT:`)."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from test_search_video import write_mp4  # tests/test_search_video.py
from vlmeval_dop.tiny import TINY_VIDEO_TOKENS, load_tiny, tiny_image, tiny_path, tiny_video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = []
    for i, frames in enumerate((24, 13)):  # 13: not a multiple of 8 (uneven arange steps)
        write_mp4(root / f"v{i}.mp4", seed=i, frames=frames)
        paths.append(str(root / f"v{i}.mp4"))
    tiny_image(5, (200, 150)).save(root / "img.png")
    return paths, str(root / "img.png")


def _wrapper(entry="tiny_videollava", **kw):
    from vlmeval_dop.registry import load_entry

    return load_entry(entry, device="cpu", **kw)


def _reference_video_inputs(processor, path, question):
    """VLMEvalKit VideoLLaVA_HF's recipe written out: PyAV, 8 frames at arange(0, total, total/8), its prompt."""
    with av.open(path) as c:
        total = c.streams.video[0].frames
        want = set(np.arange(0, total, total / 8).astype(int).tolist())
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i in want]
    assert len(frames) == 8
    return processor(text=f"USER: <video>\n{question} ASSISTANT:", videos=np.stack(frames), return_tensors="pt")


SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_video_message_inputs_follow_the_official_evaluation(files):
    import decord

    videos, image = files
    w = _wrapper()
    assert w.protocol == "official"
    for path in videos:
        msg = [{"type": "video", "value": path}, {"type": "text", "value": "What is the man doing?"}]
        got = w.build_inputs(msg, "MSVD_QA")
        reader = decord.VideoReader(path)
        frames = reader.get_batch(np.linspace(0, len(reader) - 1, 8, dtype=int)).asnumpy()
        ref = w.processor(text=f"{SYSTEM} USER: <video>\nWhat is the man doing? ASSISTANT:", videos=frames,
                          return_tensors="pt")  # fmt: skip
        assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["pixel_values_videos"], ref["pixel_values_videos"])
        # the two protocols pick other frames here (24 and 13 frames)
        other = _wrapper(protocol="vlmevalkit").build_inputs(msg, "MSVD_QA")
        assert not torch.equal(got["pixel_values_videos"], other["pixel_values_videos"])
    got = w.build_inputs([{"type": "image", "value": image}, {"type": "text", "value": "What color?"}])
    text = w.processor.tokenizer.decode([t for t in got["input_ids"][0].tolist() if t != w.model.config.image_token_id])
    assert text == f"<s> {SYSTEM} USER: \nWhat color? ASSISTANT:"
    w.nframe = 16
    with pytest.raises(ValueError, match="takes 8 frames per video"):
        w.build_inputs([{"type": "video", "value": videos[0]}, {"type": "text", "value": "q"}])
    w.nframe = 8
    with pytest.raises(ValueError, match="valid: official, vlmevalkit"):
        _wrapper(protocol="paper")


def test_video_message_inputs_are_vlmevalkits(files):
    videos, _ = files
    w = _wrapper(protocol="vlmevalkit")
    assert w.VIDEO_LLM and not w.INTERLEAVE and w.nframe == 8 and not w.use_custom_prompt("MSVD_QA")
    for path in videos:
        msg = [{"type": "video", "value": path}, {"type": "text", "value": "What is the man doing?"}]
        got = w.build_inputs(msg, "MSVD_QA")
        ref = _reference_video_inputs(w.processor, path, "What is the man doing?")
        assert sorted(got.keys()) == ["attention_mask", "input_ids", "pixel_values_videos"]
        assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["pixel_values_videos"], ref["pixel_values_videos"])
        assert int((got["input_ids"] == w.model.config.video_token_id).sum()) == TINY_VIDEO_TOKENS["videollava"]
    text = w.processor.tokenizer.decode([t for t in got["input_ids"][0].tolist() if t != w.model.config.video_token_id])
    assert text == "<s> USER: \nWhat is the man doing? ASSISTANT:"


def test_image_message_and_refusals(files):
    videos, image = files
    w = _wrapper(protocol="vlmevalkit")
    got = w.build_inputs([{"type": "image", "value": image}, {"type": "text", "value": "What color?"}])
    assert int((got["input_ids"] == w.model.config.image_token_id).sum()) == 64 and "pixel_values" in got
    ids = got["input_ids"][0]
    text = w.processor.tokenizer.decode([t for t in ids.tolist() if t != w.model.config.image_token_id])
    assert text == "<s> USER: \nWhat color? ASSISTANT:"
    with pytest.raises(ValueError, match="one video or images"):
        w.build_inputs([{"type": "video", "value": videos[0]}, {"type": "image", "value": image},
                        {"type": "text", "value": "q"}])  # fmt: skip
    w.nframe = 16  # VLMEvalKit's wrapper supports 8 frames only, and says so
    with pytest.raises(Exception, match="only supported 8 frames"):
        w.build_inputs([{"type": "video", "value": videos[0]}, {"type": "text", "value": "q"}])
    with pytest.raises(ValueError, match="resize reduction"):
        _wrapper(reducer="resize")


def test_batched_answers_equal_one_by_one(files):
    """run.py --batch-size: videos in one left-padded generate under VisPruner DOP_V, each answer as alone."""
    videos, image = files
    w = _wrapper("tiny_videollava_dopv")
    assert w.batch_blocker() is None
    msgs = [[{"type": "video", "value": p}, {"type": "text", "value": q}] for p, q in zip(videos, ("What is it?", "Where is the dog now?"))]
    one = [w.generate(m, "MSVD_QA") for m in msgs]
    n_text = int(w.build_inputs(msgs[-1])["input_ids"].shape[1]) - 520
    assert w.last_visual_tokens == 520 and w.last_layer_tokens[0] == (n_text + 128, n_text + 128)
    assert w.generate_batch(msgs, "MSVD_QA") == one
    # an image under a video policy: n_v = 128 of the image's 64 tokens is refused with the valid range
    with pytest.raises(ValueError, match="valid: 1..64"):
        w.generate([{"type": "image", "value": image}, {"type": "text", "value": "What color?"}])


def test_tiny_checkpoint_is_deterministic_and_laid_out_as_the_real_one(tmp_path):
    a, b = tiny_path("videollava", tmp_path / "a"), tiny_path("videollava", tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    model, processor = load_tiny("videollava", cache_dir=tmp_path / "a")
    tok = processor.tokenizer
    # llava-hf's layout: <image>, <video>, <pad> appended last (32000, 32001, 32002 in the real checkpoint)
    n = len(tok)
    assert [tok.convert_tokens_to_ids(t) for t in ("<image>", "<video>", "<pad>")] == [n - 3, n - 2, n - 1]
    assert (model.config.image_token_id, model.config.video_token_id, tok.pad_token_id) == (n - 3, n - 2, n - 1)
    assert model.config.vision_feature_select_strategy == "default" and model.config.vision_feature_layer == -2
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}],
                                           add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert prompt == "USER: <video>\nQ? ASSISTANT:"
    frames = tiny_video(0)
    assert frames.shape == (8, 224, 224, 3) and frames.dtype == np.uint8 and not np.array_equal(frames[0], frames[-1])
