"""Video input: decode, pick frames, size them inside the pixel budget, resize, normalise, patchify.

Legend: T frames in the input, n sampled frames (even), H, W input frame size, h, w resized frame size
(multiples of 28), P patches = (n/2) * (h/14) * (w/14), (t, h, w) grid in patches.

The rules are qwen-vl-utils' (what the Qwen team fed Qwen2.5-VL), named by version where versions differ:
  - frame count: `sampled_frame_count`, the qwen-vl-utils >= 0.0.10 rule (floor to an even count after
    clamping to [min_frames, max_frames] and to T; 0.0.8 rounded instead). Indices are round(linspace(0, T-1, n))
    computed in float32 with torch, as qwen-vl-utils does, so long videos get its exact indices too.
  - pixel budget per frame: `video_frame_size`, the total budget shared by all frames, 0.0.10/0.0.11 constants.
  - every frame is resized with `resize_bicubic` (Pillow's algorithm). qwen-vl-utils resizes decoded videos with
    torchvision's antialiased bicubic instead, which differs by up to a few levels on some pixels (README).
A list of frames is taken as already sampled (qwen-vl-utils does the same): no frame is dropped, an odd count is
padded by repeating the last frame, and its rate is `fps` (default 2.0).
"""

import io
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import torch

from .image import CLIP_MEAN, CLIP_STD, load_image, normalize
from .patches import patchify
from .resize import resize_bicubic, smart_resize

FRAME_FACTOR = 2  # frames come in pairs: the temporal patch is 2 frames
DEFAULT_FPS = 2.0  # sampling rate, and the assumed rate of a frame list
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100352 per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # 602112 per frame
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90316800 for the whole video (qwen-vl-utils 0.0.10, 0.0.11)


@dataclass(frozen=True, eq=False)
class Video:
    """A decoded video: frames uint8 [T, H, W, 3] (RGB), fps (frames per second), duration = T / fps seconds."""

    frames: np.ndarray
    fps: float
    duration: float


@dataclass(frozen=True, eq=False)
class SampledVideo:
    """The frames the model sees, before temporal padding, and where they came from.

    frames uint8 [n, H, W, 3]; indices: their positions in the input (n of them); total_frames T and
    video_fps: the input's; sampled_fps = n / T * video_fps (for a frame list: the fps it was given).
    """

    frames: np.ndarray
    indices: tuple
    total_frames: int
    video_fps: float
    sampled_fps: float


# ------------------------------------------------------------------------------------------------------
# checks


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _describe(source):
    """A short name for error messages: the path, or the byte count."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<video bytes, {len(source)} bytes>"
    return repr(os.fspath(source))


# ------------------------------------------------------------------------------------------------------
# decoding


def read_video(source, *, video_fps=None):
    """Decode every frame of a video file (path or bytes) with PyAV -> Video(frames uint8 [T, H, W, 3], fps, duration).

    fps is the stream's average frame rate (what torchvision.io.read_video and decord report), or `video_fps`
    when given (it overrides the metadata; needed for streams without a rate). duration = T / fps. A container
    cut short yields the frames before the cut, as ffmpeg does; nothing decodable raises ValueError.
    Memory: T * H * W * 3 bytes (all frames are kept, because sampling needs T first).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("video bytes are empty")
        name, file = _describe(source), io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        name, file = _describe(source), os.fspath(source)
        if not os.path.isfile(file):
            raise ValueError(f"video file {name} does not exist or is not a file")
    else:
        raise TypeError(f"video source must be a path or bytes, got {type(source).__name__}")
    if video_fps is not None:
        video_fps = _positive_float("video_fps", video_fps)
    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise ValueError(f"video {name} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {name}: {e}") from e
    if not frames:
        raise ValueError(f"video {name} has no frames")
    if video_fps is None:
        if rate is None or rate <= 0:
            raise ValueError(
                f"video {name} carries no frame rate (average_rate is {rate}); pass video_fps=<frames per second>"
            )
        video_fps = float(rate)
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"video {name} changes frame size mid-stream ({sorted(sizes)}); resize it to one size first")
    return Video(np.stack(frames), video_fps, len(frames) / video_fps)


# ------------------------------------------------------------------------------------------------------
# how many frames, which ones


def sampled_frame_count(
    total_frames, video_fps, *, fps=None, min_frames=VIDEO_MIN_FRAMES, max_frames=VIDEO_MAX_FRAMES, nframes=None
):
    """Number of frames n to sample from T = total_frames at video_fps: qwen-vl-utils >= 0.0.10 `smart_nframes`.

    With nframes: n = round(nframes / 2) * 2 (half to even). Otherwise (fps defaults to 2.0):
    n = floor(min(clamp(T / video_fps * fps, ceil_even(min_frames), floor_even(min(max_frames, T))), T) / 2) * 2.
    n must land in [2, T], else ValueError; so a 1-frame video is refused, as in qwen-vl-utils.
    """
    if isinstance(total_frames, (int, np.integer)) and not isinstance(total_frames, bool) and total_frames == 0:
        raise ValueError("video has no frames (total_frames = 0)")
    total_frames = _positive_int("total_frames", total_frames)
    if total_frames == 1:
        raise ValueError(
            "video has 1 frame; sampling needs at least 2 (qwen-vl-utils refuses it too): "
            "pass the frame as an image, or as a one-frame list, which is padded to 2 frames"
        )
    video_fps = _positive_float("video_fps", video_fps)
    if fps is not None and nframes is not None:
        raise ValueError(f"give either fps ({fps}) or nframes ({nframes}), not both")
    if nframes is not None:
        n = round(_positive_int("nframes", nframes) / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = DEFAULT_FPS if fps is None else _positive_float("fps", fps)
        lo = math.ceil(_positive_int("min_frames", min_frames) / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(_positive_int("max_frames", max_frames), total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        wanted = total_frames / video_fps * fps
        n = math.floor(min(min(max(wanted, lo), hi), total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(
            f"sampling {total_frames} frames at {video_fps} fps gives n = {n} frames; "
            f"n must be in [{FRAME_FACTOR}, {total_frames}]"
        )
    return n


def sample_frame_indices(
    total_frames, video_fps, *, fps=None, min_frames=VIDEO_MIN_FRAMES, max_frames=VIDEO_MAX_FRAMES, nframes=None
):
    """Indices (list of n ints, increasing, first 0, last T-1) of the frames to keep; n = sampled_frame_count(...).

    round(linspace(0, T-1, n)) in float32 with torch's half-to-even rounding, exactly as qwen-vl-utils. The exact
    rational k*(T-1)/(n-1) never sits on a .5 tie (n is even), but float32 rounding moves some indices by one
    from it once T reaches about 12000 frames; those are qwen-vl-utils' indices, so we keep them.
    """
    n = sampled_frame_count(
        total_frames, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames, nframes=nframes
    )
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def _frame_list(frames):
    """A list of images (anything load_image takes) -> uint8 [T, H, W, 3], all frames the same size."""
    if len(frames) == 0:
        raise ValueError("video frame list is empty")
    arrays = []
    for i, frame in enumerate(frames):
        try:
            arrays.append(load_image(frame))
        except (TypeError, ValueError) as e:
            raise type(e)(f"video frame {i}: {e}") from e
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"video frame {i} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} (WxH) but frame 0 is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all frames of a video must share one size"
            )
    return np.stack(arrays)


def _check_video(video):
    frames = video.frames
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(
            f"Video.frames must be uint8 [T, H, W, 3], got {type(frames).__name__} "
            f"{getattr(frames, 'dtype', '')} {shape}"
        )
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"Video.frames is empty: shape {frames.shape}")


def sample_video(
    video, *, fps=None, nframes=None, min_frames=VIDEO_MIN_FRAMES, max_frames=VIDEO_MAX_FRAMES, video_fps=None
):
    """Pick the frames the model sees -> SampledVideo (frames uint8 [n, H, W, 3], indices, rates).

    video: a path or bytes (decoded with read_video), a Video, or a list/tuple of frames (images).
    Decoded videos and Video objects are sampled with sample_frame_indices; video_fps overrides their rate.
    A frame list is kept whole (nframes and video_fps do not apply to it); `fps` is its rate, default 2.0.
    """
    if isinstance(video, (list, tuple)):
        if nframes is not None or video_fps is not None:
            raise ValueError(
                "a frame list is used as given: nframes and video_fps do not apply "
                "(slice the list, and give its rate as fps)"
            )
        frames = _frame_list(video)
        rate = DEFAULT_FPS if fps is None else _positive_float("fps", fps)
        return SampledVideo(frames, tuple(range(len(frames))), len(frames), rate, rate)
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        video = read_video(video, video_fps=video_fps)
    elif isinstance(video, Video):
        _check_video(video)
        if video_fps is None:
            video_fps = _positive_float("Video.fps", video.fps)
        video = Video(video.frames, video_fps, len(video.frames) / video_fps)
    else:
        raise TypeError(f"video must be a path, bytes, Video or list of frames, got {type(video).__name__}")
    total = len(video.frames)
    indices = sample_frame_indices(
        total, video.fps, fps=fps, min_frames=min_frames, max_frames=max_frames, nframes=nframes
    )
    n = len(indices)
    return SampledVideo(video.frames[indices], tuple(indices), total, video.fps, n / total * video.fps)


# ------------------------------------------------------------------------------------------------------
# pixel budget and the full pipeline


def video_frame_size(
    height,
    width,
    nframes,
    *,
    min_pixels=VIDEO_MIN_PIXELS,
    max_pixels=VIDEO_MAX_PIXELS,
    total_pixels=VIDEO_TOTAL_PIXELS,
    factor=28,
):
    """Resized frame size (h, w) for n = nframes frames of H x W under the per-frame and total budgets.

    The per-frame ceiling shrinks once the frames together would pass total_pixels:
        cap = max(min(VIDEO_MAX_PIXELS, total_pixels * 2 // n), int(min_pixels * 1.05)),
    and a caller's max_pixels can only lower it: (h, w) = smart_resize(H, W, min_pixels, min(max_pixels, cap)).
    qwen-vl-utils divides in float (total_pixels / n * 2); the floor here (transformers' cap_pixels_per_frame
    also floors) changes about 1 size in 13000 when n > 300, where the total budget binds (README).
    """
    nframes = _positive_int("nframes", nframes)
    total_pixels = _positive_int("total_pixels", total_pixels)
    min_pixels = _positive_int("min_pixels", min_pixels)
    max_pixels = _positive_int("max_pixels", max_pixels)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels * FRAME_FACTOR // nframes), int(min_pixels * 1.05))
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=min(max_pixels, cap))


def preprocess_video(
    video,
    *,
    fps=None,
    nframes=None,
    min_frames=VIDEO_MIN_FRAMES,
    max_frames=VIDEO_MAX_FRAMES,
    video_fps=None,
    min_pixels=VIDEO_MIN_PIXELS,
    max_pixels=VIDEO_MAX_PIXELS,
    total_pixels=VIDEO_TOTAL_PIXELS,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
):
    """Video -> (pixel_values float32 [P, 1176], grid_thw int64 [1, 3], second_per_grid_t: float).

    Steps: sample_video (which frames), video_frame_size (one size for all, budget counted on the padded
    frame count), resize_bicubic each frame, rescale + normalise (spec/image.py), patchify (pads an odd count
    by repeating the last frame). second_per_grid_t = temporal_patch_size / sampled_fps: the seconds one
    temporal patch spans, used by MRoPE.
    """
    sampled = sample_video(
        video, fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames, video_fps=video_fps
    )
    n, height, width, _ = sampled.frames.shape
    padded = math.ceil(n / temporal_patch_size) * temporal_patch_size
    size = video_frame_size(
        height,
        width,
        padded,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
        factor=patch_size * merge_size,
    )
    resized = np.stack([resize_bicubic(frame, size) for frame in sampled.frames])  # uint8 [n, h, w, 3]
    pixels = normalize(resized, image_mean=image_mean, image_std=image_std)  # float32 [n, 3, h, w]
    pixel_values, grid_thw = patchify(
        pixels, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size
    )
    return pixel_values, grid_thw, temporal_patch_size / sampled.sampled_fps
