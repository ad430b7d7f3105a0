"""Video-LLaVA-7B (LanguageBind/Video-LLaVA-7B-hf, `VideoLlavaForConditionalGeneration`) as a VLMEvalKit model.

Videos: the inputs are exactly those of VLMEvalKit's `VideoLLaVA_HF` (its `Video-LLaVA-7B-HF` entry): its
`generate_inner` runs as it is, with a stand-in for its model that hands back the inputs: the message's text
items joined by newlines (`message_to_promptvideo`), the prompt `USER: <video>\\n<question> ASSISTANT:`, 8
frames decoded with PyAV at `np.arange(0, total, total / 8)` and the processor (224 px, [CLS] + 256 patches per
frame: 8 x 257 = 2056 `<video>` placeholders). A video message is VLMEvalKit's
`[{"type": "video", "value": <video file>}, {"type": "text", "value": <question>}]` (what a video dataset's
`build_prompt(line, video_llm=True)` gives a model with `VIDEO_LLM = True`); the dataset's `nframe` must be 8,
as VLMEvalKit's wrapper requires.

Images (VLMEvalKit's wrapper has no image path): `USER: <image>\\n<question> ASSISTANT:`, the same format with
the image placeholder (the HF model card's image prompt), 256 `<image>` placeholders at 224 px.

Protocol (`protocol` argument). `official` (default): the official Video-LLaVA video-QA evaluation
(`videollava/eval/video/run_inference_video_qa.py`, which VisPruner's video settings and the paper's Table 18
follow): the llava_v1 conversation (`<system> USER: <video>\n<question> ASSISTANT:`, the system prompt of
LLaVA's vicuna_v1) and 8 frames at `np.linspace(0, total - 1, 8, dtype=int)` decoded with decord (LanguageBind's
default video backend); images get the same conversation. `vlmevalkit`: the inputs of VLMEvalKit's
`VideoLLaVA_HF` described above (no system prompt, PyAV frames at `np.arange(0, total, total / 8)`); the frame
choice differs for most frame counts (e.g. 24 frames: 0, 3, 6, ..., 21 vs 0, 3, 6, 9, 13, 16, 19, 23). Not
measured on real videos here. Both load in the official float16 (VLMEvalKit's wrapper loads float32; `dtype:
float32` gives that). Greedy decoding, 1024 new tokens.

The checkpoint itself: transformers' port (`LanguageBind/Video-LLaVA-7B-hf`) runs the video tower as a per-frame
`CLIPVisionModel`; the original LanguageBind video tower has a temporal attention in every encoder layer, which
the conversion (`load_state_dict(strict=False)`) drops, and the converted video and image towers differ in 3
tensors only (PKU-YuanGroup/Video-LLaVA issue #223, open). Unpruned and pruned scores of this port can therefore
differ from the paper's (original-code) Table 18 rows; DOP vs VisPruner comparisons within the port are unaffected
in kind.

Only token reducers apply (`uniform`, `vispruner`, `divprune`): the image-side `resize` (DOP_R) is refused, the
video processor fixes every frame at 224 px.
"""
from __future__ import annotations

import numpy as np
import torch
from vlmeval.vlm.video_llm.video_llava import VideoLLaVA_HF

from .base import DOPWrapper
from .llava import VICUNA_SYSTEM
from .reuse import refuse_resize, vlmeval_inputs

FRAMES = 8  # VideoLLaVA_HF.nframe: the only frame count VLMEvalKit's wrapper accepts
PROTOCOLS = ("official", "vlmevalkit")


def official_frames(path: str, frames: int = FRAMES) -> np.ndarray:
    """(frames, H, W, 3) uint8: LanguageBind's decord sampling, `np.linspace(0, total - 1, frames, dtype=int)`."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    index = np.linspace(0, len(reader) - 1, frames, dtype=int)
    return reader.get_batch(index).asnumpy()


class VideoLLaVADOP(DOPWrapper):
    """Video-LLaVA (`VideoLlavaForConditionalGeneration`): VLMEvalKit's `VideoLLaVA_HF` video inputs, and images."""

    FAMILY = "video_llava"
    MODEL_CLASS = "VideoLlavaForConditionalGeneration"
    CUDA_DTYPE = torch.float16
    DEFAULT_MAX_NEW_TOKENS = 1024  # VideoLLaVA_HF's generation_args
    VIDEO_LLM = True  # VLMEvalKit hands over the video file, not frames as images
    INTERLEAVE = False

    def __init__(self, *args, protocol: str = "official", **kwargs):
        refuse_resize(kwargs, "Video-LLaVA", "its processors fix images and frames at 224 px")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} unknown; valid: {', '.join(PROTOCOLS)}")
        super().__init__(*args, **kwargs)
        self.protocol = protocol
        self.nframe = FRAMES  # VLMEvalKit's video inference sets it to the dataset's nframe

    def use_custom_prompt(self, dataset):
        return False  # VideoLLaVA_HF keeps VLMEvalKit's default (the dataset's prompt)

    @staticmethod
    def split_message(message):
        """[(type, value)] in message order; videos stay file paths (VLMEvalKit's wrapper opens them)."""
        out = []
        for item in message:
            if item["type"] == "video":
                out.append(("video", item["value"]))
            else:
                out.extend(DOPWrapper.split_message([item]))
        return out

    def build_inputs(self, message, dataset=None):
        videos = [item for item in message if item["type"] == "video"]
        images = [item for item in message if item["type"] == "image"]
        if videos and images:
            raise ValueError("a Video-LLaVA message holds one video or images, not both (VLMEvalKit's wrapper "
                             "reads the first video only)")  # fmt: skip
        if videos:
            if len(videos) > 1:
                raise ValueError(f"a Video-LLaVA message holds one video, got {len(videos)}")
            if self.protocol == "official":
                if self.nframe != FRAMES:  # as VLMEvalKit's wrapper: the checkpoint is trained on 8 frames
                    raise ValueError(f"Video-LLaVA takes {FRAMES} frames per video; the dataset asks for {self.nframe}")
                question = "\n".join(item["value"] for item in message if item["type"] == "text")
                prompt = f"{VICUNA_SYSTEM} USER: <video>\n{question} ASSISTANT:"
                return self.processor(text=prompt, videos=official_frames(videos[0]["value"], self.nframe),
                                      return_tensors="pt")  # fmt: skip
            stub = VideoLLaVA_HF.__new__(VideoLLaVA_HF)
            stub.processor, stub.kwargs, stub.nframe = self.processor, {}, self.nframe
            inputs = vlmeval_inputs(VideoLLaVA_HF.generate_inner, stub, message, dataset)
            # its generate() call also carries its generation arguments: ours are the wrapper's (greedy, the same)
            return type(inputs)({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        parts = self.split_message(message)
        question = "\n".join(v for t, v in parts if t == "text")
        pictures = [v for t, v in parts if t == "image"]
        # one `<image>\n` line per image (none for a text-only message), then the question
        system = f"{VICUNA_SYSTEM} " if self.protocol == "official" else ""
        prompt = system + "USER: " + "<image>\n" * len(pictures) + question + " ASSISTANT:"
        return self.processor(images=pictures or None, text=prompt, return_tensors="pt",
                              return_legacy_image_output=False)  # fmt: skip
