"""Video input: decode, pick frames, size them inside the pixel budget, resize, normalise, patchify.

Legend: T frames in the input, n sampled frames (even), H, W input frame size, h, w resized frame size
(multiples of 28), P patches = (n/2) * (h/14) * (w/14), (t, h, w) grid in patches.

The rules are qwen-vl-utils' (what the Qwen team fed Qwen2.5-VL), named by version where versions differ:
  - frame count: `sampled_frame_count`, the qwen-vl-utils >= 0.0.10 rule (floor to an even count after
    clamping to [min_frames, max_frames] and to T; 0.0.8 rounded instead). Indices are round(linspace(0, T-1, n))
    computed in float32 with torch, as qwen-vl-utils does, so long videos get its exact indices too.
  - pixel budget per frame: `video_frame_size`, the total budget shared by all frames, 0.0.10/0.0.11 constants.
  - every frame is resized with `resize_bicubic` (Pillow's algorithm). qwen-vl-utils resizes decoded videos with
    torchvision's antialiased bicubic instead, which differs by up to a few levels on some pixels (docs/decisions.md, video).
A list of frames is taken as already sampled (qwen-vl-utils does the same): no frame is dropped, an odd count is
padded by repeating the last frame, and its rate is `fps` (default 2.0).
  - video_start / video_end (seconds) cut the clip first, by qwen-vl-utils 0.0.14's decord/torchcodec rule
    (`frame_range`); resized_height / resized_width fix the frame size by its rule (spec/image.py fixed_size).

Memory: a file is demuxed once to count its frames (no decoding), then decoded once, converting only the
sampled frames, straight into one preallocated uint8 [n, H, W, 3] array. Sampled frames over `max_video_bytes` (default MAX_VIDEO_BYTES = 4 GiB,
about 690 sampled 1080p frames) are refused before the second pass; the caller may raise the budget.
"""

import io
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import torch

from .image import CLIP_MEAN, CLIP_STD, MAX_DECODED_PIXELS, fixed_size, load_image, normalize
from .patches import patchify
from .resize import resize_bicubic, smart_resize

FRAME_FACTOR = 2  # frames come in pairs: the temporal patch is 2 frames
DEFAULT_FPS = 2.0  # sampling rate, and the assumed rate of a frame list
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100352 per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # 602112 per frame
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90316800 for the whole video (qwen-vl-utils 0.0.10, 0.0.11)
MAX_VIDEO_BYTES = 4 * 2**30  # budget for the kept (sampled) uint8 frames


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


def _check_budget(name, count, height, width, max_video_bytes, what="frames"):
    if max_video_bytes is None:
        return
    need = count * height * width * 3
    if need > _positive_int("max_video_bytes", max_video_bytes):
        raise ValueError(
            f"video {name}: {count} {what} of {width}x{height} need {need:,} bytes ({need / 2**30:.2f} GiB) "
            f"as uint8 RGB, over the budget of {max_video_bytes:,} bytes (max_video_bytes); sample fewer frames "
            "(fps, nframes, max_frames, video_start/video_end) or raise max_video_bytes (CLI: --max-video-bytes)"
        )


def _open_source(source):
    """A path or bytes -> (name for errors, a function returning a fresh file for av.open)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("video bytes are empty")
        data = bytes(source)
        return _describe(source), lambda: io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"video file {_describe(source)} does not exist or is not a file")
        return _describe(source), lambda: path
    raise TypeError(f"video source must be a path or bytes, got {type(source).__name__}")


def _packet_count(name, opener):
    """(video packets with a payload, demuxed but not decoded; the stream's average rate or None)."""
    try:
        with av.open(opener()) as container:
            if not container.streams.video:
                raise ValueError(f"video {name} has no video stream")
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size > 0), stream.average_rate
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {name}: {e}") from e


def _decode_pass(name, opener, keep=None, alloc=None):
    """One decoding pass. keep: {frame index: slot}, filled into alloc((H, W)) made at the first frame;
    None to only count. Returns (frame count, the filled array or None); a frame of another size is refused."""
    count, size, out = 0, None, None
    try:
        with av.open(opener()) as container:
            if not container.streams.video:
                raise ValueError(f"video {name} has no video stream")
            for frame in container.decode(container.streams.video[0]):
                if size is None:
                    size = (frame.height, frame.width)
                    out = alloc(size) if keep is not None else None
                elif (frame.height, frame.width) != size:
                    raise ValueError(
                        f"video {name} changes frame size mid-stream (frame {count} is {frame.width}x{frame.height}, "
                        f"frame 0 is {size[1]}x{size[0]}); resize it to one size first"
                    )
                if keep is not None and count in keep:
                    out[keep[count]] = frame.to_ndarray(format="rgb24")  # only kept frames are converted
                count += 1
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {name}: {e}") from e
    if count == 0:
        raise ValueError(f"video {name} has no frames")
    return count, out


def _rate(name, rate, video_fps):
    if video_fps is not None:
        return _positive_float("video_fps", video_fps)
    if rate is None or rate <= 0:
        raise ValueError(
            f"video {name} carries no frame rate (average_rate is {rate}); pass video_fps=<frames per second>"
        )
    return float(rate)


def _decode_selected(source, video_fps, choose, max_video_bytes, what):
    """Decode only the frames choose(T, rate) picks -> (frames uint8 [n, H, W, 3], indices, T, rate).

    T is first taken from the demuxed packet count (no decoding); the decode pass counts the frames for real,
    and when the two differ (a damaged or unusual file) the indices are chosen again from the true count and
    the file is decoded once more. The kept frames go into one array, checked against max_video_bytes first.
    """
    name, opener = _open_source(source)
    if video_fps is not None:
        video_fps = _positive_float("video_fps", video_fps)
    total, rate = _packet_count(name, opener)
    for _ in range(2):
        if total == 0:
            total, _ = _decode_pass(name, opener)
        rate = _rate(name, rate, video_fps)
        indices = choose(total, rate)
        slots = {}
        for slot, index in enumerate(indices):
            slots.setdefault(index, slot)

        n = len(indices)

        def alloc(size, n=n):
            _check_budget(name, n, size[0], size[1], max_video_bytes, what)
            return np.empty((n, size[0], size[1], 3), dtype=np.uint8)

        count, out = _decode_pass(name, opener, slots, alloc)
        if count == total:
            for slot, index in enumerate(indices):  # a repeated index shares its first slot's frame
                if slots[index] != slot:
                    out[slot] = out[slots[index]]
            return out, indices, total, rate
        total = count
    raise AssertionError(f"video {name}: the frame count changed between two decodes of the same file")


def read_video(source, *, video_fps=None, max_video_bytes=MAX_VIDEO_BYTES):
    """Decode every frame of a video file (path or bytes) with PyAV -> Video(frames uint8 [T, H, W, 3], fps, duration).

    fps is the stream's average frame rate (what torchvision.io.read_video and decord report), or `video_fps`
    when given (it overrides the metadata; needed for streams without a rate). duration = T / fps. A container
    cut short yields the frames before the cut, as ffmpeg does; nothing decodable raises ValueError.
    Memory: T * H * W * 3 bytes in one array, refused over max_video_bytes (None: no budget).
    """
    frames, _, total, rate = _decode_selected(
        source, video_fps, lambda total, rate: list(range(total)), max_video_bytes, "frames"
    )
    return Video(frames, rate, total / rate)


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


def frame_range(total_frames, video_fps, *, video_start=None, video_end=None):
    """(first, last) frame of the clip cut by video_start / video_end seconds: qwen-vl-utils 0.0.14's rule
    for its decord and torchcodec readers.

    Both times are clamped to [0, T / video_fps]; first = ceil(start * video_fps),
    last = min(floor(end * video_fps), T - 1); first >= last raises ValueError. Neither given: (0, T - 1).
    """
    if video_start is None and video_end is None:
        return 0, total_frames - 1  # sampled_frame_count checks T and the rate
    total_frames = _positive_int("total_frames", total_frames)
    video_fps = _positive_float("video_fps", video_fps)
    duration = total_frames / video_fps
    first, last = 0, total_frames - 1
    if video_start is not None:
        if isinstance(video_start, bool) or not isinstance(video_start, (int, float)) or not math.isfinite(video_start):
            raise ValueError(f"video_start must be a finite number of seconds, got {video_start!r}")
        first = math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    if video_end is not None:
        if isinstance(video_end, bool) or not isinstance(video_end, (int, float)) or not math.isfinite(video_end):
            raise ValueError(f"video_end must be a finite number of seconds, got {video_end!r}")
        last = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(
            f"video_start={video_start}, video_end={video_end} select frames {first}..{last} of a "
            f"{duration:.3f} s video ({total_frames} frames at {video_fps} fps); the cut must keep 2 frames or more"
        )
    return first, last


def sample_frame_indices(
    total_frames,
    video_fps,
    *,
    fps=None,
    min_frames=VIDEO_MIN_FRAMES,
    max_frames=VIDEO_MAX_FRAMES,
    nframes=None,
    video_start=None,
    video_end=None,
):
    """Indices (list of n ints, increasing, first 0, last T-1) of the frames to keep; n = sampled_frame_count(...).

    round(linspace(0, T-1, n)) in float32 with torch's half-to-even rounding, exactly as qwen-vl-utils. The exact
    rational k*(T-1)/(n-1) never sits on a .5 tie (n is even), but float32 rounding moves some indices by one
    from it once T reaches about 12000 frames; those are qwen-vl-utils' indices, so we keep them.
    With video_start / video_end the clip is frames first..last (frame_range): n counts those, and the
    indices are round(linspace(first, last, n)).
    """
    first, last = frame_range(total_frames, video_fps, video_start=video_start, video_end=video_end)
    n = sampled_frame_count(
        last - first + 1, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames, nframes=nframes
    )
    return torch.linspace(first, last, n).round().long().tolist()


def _frame_list(frames, max_decoded_pixels, max_video_bytes):
    """A list of images (anything load_image takes) -> uint8 [T, H, W, 3] in one array, all frames one size."""
    if len(frames) == 0:
        raise ValueError("video frame list is empty")
    out = None
    for i, frame in enumerate(frames):
        try:
            array = load_image(frame, max_decoded_pixels=max_decoded_pixels)
        except (TypeError, ValueError) as e:
            raise type(e)(f"video frame {i}: {e}") from e
        if out is None:
            _check_budget(f"<list of {len(frames)} frames>", len(frames), *array.shape[:2], max_video_bytes)
            out = np.empty((len(frames),) + array.shape, dtype=np.uint8)
        elif array.shape != out.shape[1:]:
            raise ValueError(
                f"video frame {i} is {array.shape[1]}x{array.shape[0]} (WxH) but frame 0 is "
                f"{out.shape[2]}x{out.shape[1]}; all frames of a video must share one size"
            )
        out[i] = array
    return out


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
    video,
    *,
    fps=None,
    nframes=None,
    min_frames=VIDEO_MIN_FRAMES,
    max_frames=VIDEO_MAX_FRAMES,
    video_fps=None,
    video_start=None,
    video_end=None,
    max_video_bytes=MAX_VIDEO_BYTES,
    max_decoded_pixels=MAX_DECODED_PIXELS,
):
    """Pick the frames the model sees -> SampledVideo (frames uint8 [n, H, W, 3], indices, rates).

    video: a path or bytes (only the sampled frames are kept), a Video, or a list/tuple of
    frames (images). Decoded videos and Video objects are sampled with sample_frame_indices (video_start /
    video_end cut them first); video_fps overrides their rate. A frame list is kept whole (nframes, video_fps,
    video_start and video_end do not apply to it); `fps` is its rate, default 2.0. The kept frames must fit
    max_video_bytes (None: no budget); frame-list images obey max_decoded_pixels (spec/image.py).
    """
    pick = dict(fps=fps, min_frames=min_frames, max_frames=max_frames, nframes=nframes)
    cut = dict(video_start=video_start, video_end=video_end)
    if isinstance(video, (list, tuple)):
        if nframes is not None or video_fps is not None or video_start is not None or video_end is not None:
            raise ValueError(
                "a frame list is used as given: nframes, video_fps, video_start and video_end do not apply "
                "(slice the list, and give its rate as fps)"
            )
        frames = _frame_list(video, max_decoded_pixels, max_video_bytes)
        rate = DEFAULT_FPS if fps is None else _positive_float("fps", fps)
        return SampledVideo(frames, tuple(range(len(frames))), len(frames), rate, rate)
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        frames, indices, total, rate = _decode_selected(
            video,
            video_fps,
            lambda total, rate: sample_frame_indices(total, rate, **pick, **cut),
            max_video_bytes,
            "sampled frames",
        )
    elif isinstance(video, Video):
        _check_video(video)
        total = len(video.frames)
        rate = _positive_float("Video.fps", video.fps) if video_fps is None else _positive_float("video_fps", video_fps)
        indices = sample_frame_indices(total, rate, **pick, **cut)
        _check_budget("<Video>", len(indices), *video.frames.shape[1:3], max_video_bytes, "sampled frames")
        frames = video.frames[indices]
    else:
        raise TypeError(f"video must be a path, bytes, Video or list of frames, got {type(video).__name__}")
    first, last = frame_range(total, rate, **cut)
    span = last - first + 1
    return SampledVideo(frames, tuple(indices), total, rate, len(indices) / span * rate)


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
    also floors) changes about 1 size in 13000 when n > 300, where the total budget binds (docs/decisions.md, video).
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
    video_start=None,
    video_end=None,
    min_pixels=VIDEO_MIN_PIXELS,
    max_pixels=VIDEO_MAX_PIXELS,
    total_pixels=VIDEO_TOTAL_PIXELS,
    resized_height=None,
    resized_width=None,
    max_video_bytes=MAX_VIDEO_BYTES,
    max_decoded_pixels=MAX_DECODED_PIXELS,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
):
    """Video -> (pixel_values float32 [P, 1176], grid_thw int64 [1, 3], second_per_grid_t: float).

    Steps: sample_video (which frames; video_start / video_end cut first), video_frame_size (one size for all,
    budget counted on the padded frame count) unless resized_height + resized_width fix it (qwen-vl-utils rule,
    budgets ignored), resize_bicubic each frame into one array, rescale + normalise (spec/image.py), patchify
    (pads an odd count by repeating the last frame). second_per_grid_t = temporal_patch_size / sampled_fps:
    the seconds one temporal patch spans, used by MRoPE.
    """
    sampled = sample_video(
        video,
        fps=fps,
        nframes=nframes,
        min_frames=min_frames,
        max_frames=max_frames,
        video_fps=video_fps,
        video_start=video_start,
        video_end=video_end,
        max_video_bytes=max_video_bytes,
        max_decoded_pixels=max_decoded_pixels,
    )
    n, height, width, _ = sampled.frames.shape
    padded = math.ceil(n / temporal_patch_size) * temporal_patch_size
    factor = patch_size * merge_size
    size = fixed_size(resized_height, resized_width, factor) or video_frame_size(
        height,
        width,
        padded,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
        factor=factor,
    )
    resized = np.empty((n, size[0], size[1], 3), dtype=np.uint8)  # uint8 [n, h, w, 3]
    for i, frame in enumerate(sampled.frames):
        resized[i] = resize_bicubic(frame, size)
    sampled_fps = sampled.sampled_fps
    del sampled  # the full-size frames are no longer needed
    pixels = normalize(resized, image_mean=image_mean, image_std=image_std)  # float32 [n, 3, h, w]
    pixel_values, grid_thw = patchify(
        pixels, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size
    )
    return pixel_values, grid_thw, temporal_patch_size / sampled_fps
