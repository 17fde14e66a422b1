"""Test helpers for spec/video.py: small videos encoded with PyAV, and qwen-vl-utils loaded without torchvision.

qwen-vl-utils 0.0.11 imports torchvision at load, and torchvision does not import beside this torch. Its
vision_process.py is loaded here with a stand-in `torchvision` module that provides only what the decoded-video
path calls: io.read_video (PyAV, as torchvision decodes: every frame, rgb24, TCHW, info["video_fps"] =
float(average_rate)) and transforms.functional.resize (torchvision's tensor path: float32
F.interpolate(bicubic, antialias=True, align_corners=False), clamp to 0..255, round, uint8). Everything else in
that file (smart_nframes, smart_resize, the pixel budget, fetch_video) is qwen-vl-utils' own code.
"""

import enum
import importlib.util
import io
import os
import sys
import types
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F


def pattern_frames(count, height, width, seed=0):
    """uint8 [count, H, W, 3]: smooth gradients that move with t, plus mild noise (compresses well, not flat)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(count):
        r = 128 + 100 * np.sin((xx + 3 * t) / 9.0)
        g = 128 + 100 * np.cos((yy - 2 * t) / 7.0)
        b = (xx * 255 // max(width - 1, 1) + 11 * t) % 256
        img = np.stack([r, g, b], -1) + rng.normal(0, 4, (height, width, 3))
        frames.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return np.stack(frames)


def encode_video(frames, fps, *, container="mp4", codec="mpeg4", pix_fmt=None, bit_rate=4_000_000):
    """uint8 [T, H, W, 3] -> encoded bytes at a constant `fps` (int or Fraction)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        if pix_fmt:
            stream.pix_fmt = pix_fmt
        else:
            stream.bit_rate = bit_rate
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def lossless_video(frames, fps):
    """Matroska + FFV1 in bgr0: decodes back to exactly the same RGB frames."""
    return encode_video(frames, fps, container="matroska", codec="ffv1", pix_fmt="bgr0")


def rateless_one_frame_video():
    """A NUT file with one frame and no frame rate: PyAV reports average_rate None."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="nut") as out:
        stream = out.add_stream("ffv1")
        stream.height, stream.width, stream.pix_fmt = 48, 64, "bgr0"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        frame = av.VideoFrame.from_ndarray(pattern_frames(1, 48, 64)[0], format="rgb24")
        frame.pts, frame.time_base = 0, Fraction(1, 1000)
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    return buf.getvalue()


def torchvision_resize_uint8(video, size):
    """uint8 [..., C, H, W] -> uint8 [..., C, h, w] the way torchvision.transforms.functional.resize does it
    for tensors (BICUBIC, antialias=True)."""
    if list(video.shape[-2:]) == list(size):
        return video
    x = video.reshape(-1, *video.shape[-3:]).float()
    y = F.interpolate(x, size=list(size), mode="bicubic", align_corners=False, antialias=True)
    y = y.clamp(0, 255).round().to(torch.uint8)
    return y.reshape(*video.shape[:-2], *size)


def _torchvision_read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    assert start_pts == 0.0 and end_pts is None and output_format == "TCHW"
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate)
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return video, torch.empty(1, 0), {"video_fps": fps}


def _torchvision_stub():
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.22.0"
    tv.io = types.ModuleType("torchvision.io")
    tv.io.read_video = _torchvision_read_video
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.InterpolationMode = enum.Enum("InterpolationMode", {"BICUBIC": "bicubic"})
    tv.transforms.functional = types.SimpleNamespace(
        resize=lambda video, size, interpolation, antialias: torchvision_resize_uint8(video, size)
    )
    return {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}


def load_qwen_vl_utils():
    """qwen_vl_utils/vision_process.py (the installed 0.0.11 wheel) as a module, torchvision stubbed only while
    it loads (sys.modules is restored, so transformers still sees that torchvision is absent)."""
    spec = importlib.util.find_spec("qwen_vl_utils")  # finds the folder without running its __init__
    if spec is None:
        raise RuntimeError("qwen-vl-utils is not installed: pip install -e '.[test]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "vision_process.py")
    stubs = _torchvision_stub()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module_spec = importlib.util.spec_from_file_location("_qwen_vl_utils_vision_process_0_0_11", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    # decord / torchcodec are not installed, so fetch_video reads through the stubbed torchvision path
    module.get_video_reader_backend = lambda: "torchvision"
    return module
