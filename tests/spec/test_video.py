"""spec/video.py: decoding, frame sampling, pixel budget, layout, errors.

Expected values come from hf_reference.md §3 (worked examples), from the rules written out by hand below, and
from qwen-vl-utils 0.0.11 itself (its vision_process.py, loaded with torchvision stubbed: tests/spec/videos.py).
"""

import io
import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image
from qwen25vl.spec.image import CLIP_MEAN, CLIP_STD
from qwen25vl.spec.resize import resize_bicubic
from qwen25vl.spec.video import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    Video,
    preprocess_video,
    read_video,
    sample_frame_indices,
    sample_video,
    sampled_frame_count,
    video_frame_size,
)

from .videos import (
    encode_video,
    load_qwen_vl_utils,
    lossless_video,
    pattern_frames,
    rateless_one_frame_video,
)


@pytest.fixture(scope="module")
def qvu():
    return load_qwen_vl_utils()


def exact_indices(total, n):
    """round(k (T-1) / (n-1)) for k < n in exact integers; n even => (n-1) odd => never a .5 tie."""
    if n == 1:
        return [0]
    return [(2 * k * (total - 1) + (n - 1)) // (2 * (n - 1)) for k in range(n)]


def frame_count_by_hand(total, video_fps, fps, min_frames, max_frames):
    """hf_reference.md §3.1, qwen-vl-utils >= 0.0.10, written out independently; None where it raises."""
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, total) / 2) * 2
    n = math.floor(min(min(max(total / video_fps * fps, lo), hi), total) / 2) * 2
    return n if 2 <= n <= total else None


# ------------------------------------------------------------------------------------------------------
# frame count and indices


def test_hf_reference_examples():
    assert sample_frame_indices(300, 30) == [
        0,
        16,
        31,
        47,
        63,
        79,
        94,
        110,
        126,
        142,
        157,
        173,
        189,
        205,
        220,
        236,
        252,
        268,
        283,
        299,
    ]
    assert sampled_frame_count(251, 25) == 20  # n0 = 20.08
    assert sample_frame_indices(10, 1.0, nframes=4) == [0, 3, 6, 9]
    assert sampled_frame_count(3, 30) == 2  # min_frames 4 is capped by T: 3 frames -> 2


def test_sampled_fps_and_second_per_grid_t():
    frames = np.zeros((251, 2, 2, 3), np.uint8)
    sampled = sample_video(Video(frames, 25.0, 251 / 25))
    assert len(sampled.indices) == 20 and sampled.total_frames == 251
    assert sampled.sampled_fps == 20 / 251 * 25 and round(sampled.sampled_fps, 3) == 1.992
    frames = np.zeros((300, 28, 28, 3), np.uint8)
    _, grid, spgt = preprocess_video(Video(frames, 30.0, 10.0), min_pixels=784, max_pixels=784)
    assert grid.tolist() == [[10, 2, 2]] and spgt == pytest.approx(1.0)  # 2 / (20 / 300 * 30)


@given(
    total=st.integers(1, 3000),
    video_fps=st.sampled_from([1.0, 7.5, 23.976, 25.0, 29.97, 30.0, 60.0, 120.0]),
    fps=st.floats(0.05, 8.0),
    min_frames=st.integers(1, 12),
    max_frames=st.integers(1, 1000),
)
def test_frame_count_matches_qwen_vl_utils(qvu, total, video_fps, fps, min_frames, max_frames):
    ele = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames}
    by_hand = frame_count_by_hand(total, video_fps, fps, min_frames, max_frames)
    try:
        theirs = qvu.smart_nframes(ele, total_frames=total, video_fps=video_fps)
    except ValueError:
        theirs = None
    assert theirs == by_hand
    if theirs is None:
        with pytest.raises(ValueError):
            sampled_frame_count(total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    else:
        assert sampled_frame_count(total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames) == theirs


@given(total=st.integers(1, 400), nframes=st.integers(1, 500))
def test_nframes_matches_qwen_vl_utils(qvu, total, nframes):
    try:
        theirs = qvu.smart_nframes({"nframes": nframes}, total_frames=total, video_fps=30.0)
    except ValueError:
        with pytest.raises(ValueError):
            sampled_frame_count(total, 30.0, nframes=nframes)
        return
    assert theirs == round(nframes / 2) * 2  # half to even: 1 -> 0 (refused), 3 -> 4, 5 -> 4
    assert sampled_frame_count(total, 30.0, nframes=nframes) == theirs


def test_default_max_frames_equals_min_768_total(qvu):
    # qwen-vl-utils' default max_frames is min(768, T); ours is 768 with T applied after: same counts
    for total in (2, 3, 5, 17, 767, 768, 769, 2000):
        for video_fps in (0.5, 1.0, 30.0):
            assert sampled_frame_count(total, video_fps) == qvu.smart_nframes({}, total, video_fps)


@given(
    total=st.integers(2, 11999),
    video_fps=st.floats(0.5, 120.0),
    fps=st.floats(0.05, 8.0),
    min_frames=st.integers(1, 12),
    max_frames=st.integers(2, 800),
)
def test_indices_properties(total, video_fps, fps, min_frames, max_frames):
    n = frame_count_by_hand(total, video_fps, fps, min_frames, max_frames)
    assume(n is not None)
    idx = sample_frame_indices(total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    assert len(idx) == n and n % 2 == 0 and 2 <= n <= min(total, max(max_frames, 2))
    assert n >= min(math.ceil(min_frames / 2) * 2, math.floor(min(max_frames, total) / 2) * 2)
    assert idx[0] == 0 and idx[-1] == total - 1
    assert all(a < b for a, b in zip(idx, idx[1:]))  # strictly increasing: the step (T-1)/(n-1) is >= 1
    assert idx == exact_indices(total, n)  # float32 linspace equals the exact rule below ~12000 frames


def test_long_video_indices_follow_float32_linspace():
    # T = 12342, n = 768 is the first case where float32 linspace (qwen-vl-utils) leaves the exact rational
    idx = sample_frame_indices(12342, 30.0, nframes=768)
    exact = exact_indices(12342, 768)
    assert idx == torch.linspace(0, 12341, 768, dtype=torch.float32).round().long().tolist()
    assert sum(a != b for a, b in zip(idx, exact)) >= 1
    assert all(abs(a - b) <= 1 for a, b in zip(idx, exact))


# ------------------------------------------------------------------------------------------------------
# pixel budget


def budget_by_hand(nframes, min_pixels, max_pixels, total_pixels, *, floor):
    """qwen-vl-utils fetch_video budget (float division), or with the division floored (transformers)."""
    per_frame = total_pixels * 2 // nframes if floor else total_pixels / nframes * 2
    return min(max_pixels, max(min(VIDEO_MAX_PIXELS, per_frame), int(min_pixels * 1.05)))


@given(
    height=st.integers(15, 4000),
    width=st.integers(15, 4000),
    nframes=st.integers(1, 384).map(lambda k: 2 * k),
    min_pixels=st.sampled_from([VIDEO_MIN_PIXELS, 3136, 50176]),
    max_pixels=st.sampled_from([VIDEO_MAX_PIXELS, 200704]),
    total_pixels=st.sampled_from([VIDEO_TOTAL_PIXELS, 19267584, 2000000]),
)
def test_frame_size_matches_qwen_vl_utils(qvu, height, width, nframes, min_pixels, max_pixels, total_pixels):
    assume(max(height, width) / min(height, width) <= 200)
    h, w = video_frame_size(
        height, width, nframes, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
    )
    cap = budget_by_hand(nframes, min_pixels, max_pixels, total_pixels, floor=True)
    assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    if round(height / 28) * round(width / 28) * 784 >= min_pixels:
        # budget respected per frame, except when a thin frame's short side is held at 28 (the clamp of the
        # transformers rule; qwen-vl-utils returns a 0 side there, checked below)
        assert h * w <= cap or min(h, w) == 28
    else:  # too small: lifted to min_pixels, which may pass the cap (both references do this)
        assert h * w >= min_pixels
    exact = budget_by_hand(nframes, min_pixels, max_pixels, total_pixels, floor=False)
    theirs = qvu.smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=exact)
    if 0 in theirs:  # qwen-vl-utils' unclamped floor branch; the reference keeps a 28 side (transformers rule)
        assert min(h, w) == 28
    elif exact == cap:  # budget integral (always true for n <= 300 with the default total)
        assert (h, w) == theirs
    else:  # floored budget: equal to qwen-vl-utils on the floored budget
        assert (h, w) == qvu.smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=cap)


def test_frame_size_tiny_side_uses_transformers_rule(qvu):
    # sides <= 14 px round to 0: transformers (the project's smart_resize) lifts through the min branch,
    # qwen-vl-utils clamps the rounding to 28 first. Documented difference (README, video section).
    assert video_frame_size(14, 98, 2, min_pixels=3136) == (28, 168)
    assert qvu.smart_resize(14, 98, factor=28, min_pixels=3136, max_pixels=VIDEO_MAX_PIXELS) == (28, 112)


def test_frame_size_examples():
    # hf_reference.md §1.4, video rows (<= 300 frames) and the 768-frame row
    assert video_frame_size(1080, 1920, 20) == (560, 1008)
    assert video_frame_size(720, 1280, 20) == (560, 1008)
    assert video_frame_size(360, 640, 20) == (364, 644)
    assert video_frame_size(240, 320, 20) == (280, 392)
    assert video_frame_size(1080, 1920, 768) == (336, 644)  # cap = 90316800 * 2 // 768 = 235200


# ------------------------------------------------------------------------------------------------------
# decoding

VIDEOS = [  # (container, codec, frames, height, width, fps, lossless)
    ("mp4", "mpeg4", 11, 48, 64, 10, False),
    ("mp4", "libx264", 13, 96, 128, 25, False),
    ("avi", "mpeg4", 9, 64, 96, Fraction(30000, 1001), False),
    ("matroska", "ffv1", 7, 60, 80, 30, True),
]


@pytest.mark.parametrize("container,codec,count,height,width,fps,lossless", VIDEOS)
def test_read_video_round_trip(tmp_path, container, codec, count, height, width, fps, lossless):
    frames = pattern_frames(count, height, width)
    data = lossless_video(frames, fps) if lossless else encode_video(frames, fps, container=container, codec=codec)
    path = tmp_path / f"clip.{container}"
    path.write_bytes(data)
    for video in (read_video(data), read_video(path), read_video(str(path))):
        assert video.frames.dtype == np.uint8 and video.frames.shape == (count, height, width, 3)
        assert video.fps == pytest.approx(float(fps), rel=1e-12)
        assert video.duration == pytest.approx(count / float(fps), rel=1e-12)
        error = np.abs(video.frames.astype(int) - frames).mean()
        assert error == 0 if lossless else error < 6, error
    assert read_video(data, video_fps=5).fps == 5.0 and read_video(data, video_fps=5).duration == count / 5


@pytest.mark.parametrize(
    "ele",
    [
        {},
        {"fps": 4.0},
        {"nframes": 6},
        {"fps": 1.0, "min_frames": 6},
        {"min_pixels": 3136, "total_pixels": 20000},
        {"min_pixels": 3136, "total_pixels": 6000},
    ],
)
def test_pipeline_matches_qwen_vl_utils_fetch_video(qvu, tmp_path, ele):
    frames = pattern_frames(23, 96, 128, seed=1)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_video(frames, 10, codec="mpeg4"))
    theirs, their_fps = qvu.fetch_video({"video": str(path), **ele}, return_video_sample_fps=True)
    sampling = {k: ele[k] for k in ("fps", "nframes", "min_frames") if k in ele}
    budget = {k: ele[k] for k in ("min_pixels", "total_pixels") if k in ele}
    sampled = sample_video(path, **sampling)
    n, h, w = theirs.shape[0], theirs.shape[2], theirs.shape[3]
    assert len(sampled.indices) == n and sampled.sampled_fps == their_fps
    assert video_frame_size(96, 128, n, **budget) == (h, w)
    ours = np.stack([resize_bicubic(f, (h, w)) for f in sampled.frames])  # Pillow's bicubic
    diff = np.abs(ours.astype(int) - theirs.permute(0, 2, 3, 1).numpy().astype(int))
    # qwen-vl-utils resizes decoded video with torchvision's antialiased bicubic: a few levels on some pixels
    # (measured here: 79-88% equal, <= 0.03% off by > 1, max 3; noisier content near 0 / 255 reaches 15+,
    # because Pillow clips to 0..255 between its two passes and torchvision does not)
    stats = (diff.max(), (diff == 0).mean(), (diff > 1).mean(), (diff > 3).mean())
    assert diff.max() <= 32 and stats[1] > 0.75 and stats[2] < 1e-3 and stats[3] < 1e-4, stats
    pixel_values, grid, spgt = preprocess_video(path, **sampling, **budget)
    assert grid.tolist() == [[n // 2, h // 14, w // 14]] and pixel_values.shape == (n // 2 * h * w // 196, 1176)
    assert spgt == pytest.approx(2 / their_fps, rel=1e-12)


# ------------------------------------------------------------------------------------------------------
# layout and frame lists


def expected_rows(frames):
    """Hand-built pixel_values for uint8 frames [T, H, W, 3] already at a valid size (hf_reference.md §2):
    value[c*392 + tau*196 + y*14 + x] = norm(frame[2t + tau])[c, 14*row + y, 14*col + x], rows ordered
    t, block row, block col, (0,0) (0,1) (1,0) (1,1)."""
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]])
    norm = (frames.astype(np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # [T, H, W, 3]
    T, H, W, _ = frames.shape
    rows = []
    for t in range(T // 2):
        for bh in range(H // 28):
            for bw in range(W // 28):
                for mh in range(2):
                    for mw in range(2):
                        r, c = 2 * bh + mh, 2 * bw + mw
                        patch = norm[2 * t : 2 * t + 2, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14]  # [tau, y, x, C]
                        rows.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_frame_list_layout_and_padding(count):
    frames = pattern_frames(count, 56, 84, seed=count)  # 56 x 84 = 4704 px: inside the budget below, no resize
    pixel_values, grid, spgt = preprocess_video(list(frames), min_pixels=3136, max_pixels=4704)
    assert pixel_values.dtype == torch.float32 and grid.dtype == torch.int64
    assert grid.tolist() == [[math.ceil(count / 2), 4, 6]]  # grid_t = ceil(n / 2)
    np.testing.assert_allclose(pixel_values.numpy(), expected_rows(frames), rtol=0, atol=2e-6)
    assert spgt == 1.0  # a frame list is taken at 2 fps unless told: 2 / 2.0


def test_frame_list_fps_and_kinds(tmp_path):
    frames = pattern_frames(3, 56, 56)
    path = tmp_path / "f.png"
    Image.fromarray(frames[1]).save(path)
    mixed = [frames[0], str(path), Image.fromarray(frames[2])]
    pixel_values, grid, spgt = preprocess_video(mixed, fps=4.0, min_pixels=3136, max_pixels=3136)
    assert spgt == 0.5 and grid.tolist() == [[2, 4, 4]]
    np.testing.assert_allclose(pixel_values.numpy(), expected_rows(frames), rtol=0, atol=2e-6)
    sampled = sample_video(mixed, fps=4.0)
    assert sampled.indices == (0, 1, 2) and sampled.sampled_fps == 4.0 and sampled.total_frames == 3


def test_budget_respected_and_total_budget_binds():
    frames = pattern_frames(4, 96, 128)
    video = Video(frames, 2.0, 2.0)
    _, grid, _ = preprocess_video(video, min_pixels=3136, total_pixels=20000)
    t, gh, gw = grid[0].tolist()
    assert t == 2 and (gh * 14, gw * 14) == (84, 112)  # cap 20000 * 2 // 4 = 10000: 96x128 shrinks to 84x112
    _, grid, _ = preprocess_video(video)  # default budget: lifted to >= 100352 px
    assert grid[0, 1].item() * grid[0, 2].item() * 196 >= VIDEO_MIN_PIXELS


# ------------------------------------------------------------------------------------------------------
# bad input: each a ValueError / TypeError that names the input


def test_corrupt_and_truncated_bytes(tmp_path):
    good = lossless_video(pattern_frames(6, 48, 64), 10)
    with pytest.raises(ValueError, match="cannot decode video <video bytes, 1000 bytes>"):
        read_video(b"\x00" * 1000)
    with pytest.raises(ValueError, match="cannot decode video"):
        read_video(encode_video(pattern_frames(20, 48, 64), 10)[:200])
    with pytest.raises(ValueError, match="video bytes are empty"):
        read_video(b"")
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    # cut inside the first frame: the header is readable, no frame decodes
    header_only = next(good[:k] for k in range(200, len(good)) if _opens_without_frames(good[:k]))
    with pytest.raises(ValueError, match="has no frames"):
        preprocess_video(header_only)
    # cut later: the frames before the cut are used, as ffmpeg does
    partial = read_video(good[: len(good) * 3 // 4])
    assert 1 <= len(partial.frames) < 6


def _opens_without_frames(data):
    try:
        with av.open(io.BytesIO(data)) as c:
            return bool(c.streams.video) and sum(1 for _ in c.decode(c.streams.video[0])) == 0
    except av.error.FFmpegError:
        return False


def test_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    with pytest.raises(ValueError, match="has no video stream"):
        read_video(buf.getvalue())


def test_no_frame_rate_and_one_frame():
    data = rateless_one_frame_video()
    with pytest.raises(ValueError, match="carries no frame rate.*video_fps"):
        read_video(data)
    video = read_video(data, video_fps=5.0)
    assert video.fps == 5.0 and video.frames.shape == (1, 48, 64, 3) and video.duration == 0.2
    # a 1-frame video: refused, as qwen-vl-utils does; the message says how to pass it instead
    with pytest.raises(ValueError, match="1 frame.*one-frame list"):
        preprocess_video(data, video_fps=5.0)
    with pytest.raises(ValueError, match="1 frame"):
        preprocess_video(encode_video(pattern_frames(1, 48, 64), 10))
    # ... and the one-frame list works: padded to 2 frames
    _, grid, _ = preprocess_video([video.frames[0]], min_pixels=3136, max_pixels=3136)
    assert grid.tolist() == [[1, 4, 4]]


def test_argument_errors():
    video = Video(pattern_frames(8, 28, 28), 4.0, 2.0)
    with pytest.raises(ValueError, match=r"either fps \(2.0\) or nframes \(4\)"):
        preprocess_video(video, fps=2.0, nframes=4)
    with pytest.raises(ValueError, match="n = 10 frames; n must be in \\[2, 8\\]"):
        sample_frame_indices(8, 4.0, nframes=10)
    with pytest.raises(ValueError, match="video has no frames"):
        sample_frame_indices(0, 30.0)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps must be a finite number > 0"):
            sample_frame_indices(10, 30.0, fps=bad)
        with pytest.raises(ValueError, match="video_fps must be"):
            sample_frame_indices(10, bad)
    with pytest.raises(TypeError, match="total_frames must be an int"):
        sample_frame_indices(10.0, 30.0)
    with pytest.raises(TypeError, match="video must be a path, bytes, Video or list of frames, got ndarray"):
        preprocess_video(video.frames)
    with pytest.raises(TypeError, match="got int"):
        preprocess_video(3)
    with pytest.raises(ValueError, match="Video.frames must be uint8"):
        preprocess_video(Video(video.frames.astype(np.float32), 4.0, 2.0))
    with pytest.raises(ValueError, match="Video.fps must be"):
        preprocess_video(Video(video.frames, 0.0, 2.0))
    with pytest.raises(ValueError, match="min_pixels \\(5000\\) must be <= max_pixels \\(4000\\)"):
        preprocess_video(video, min_pixels=5000, max_pixels=4000)


def test_frame_list_errors():
    with pytest.raises(ValueError, match="video frame list is empty"):
        preprocess_video([])
    frames = list(pattern_frames(3, 28, 28))
    with pytest.raises(ValueError, match="video frame 2 is 56x28 \\(WxH\\) but frame 0 is 28x28"):
        preprocess_video(frames[:2] + [np.zeros((28, 56, 3), np.uint8)])
    with pytest.raises(TypeError, match="video frame 1: "):
        preprocess_video([frames[0], np.zeros((28, 28, 3), np.float32)])
    with pytest.raises(ValueError, match="nframes, video_fps, video_start and video_end do not apply"):
        preprocess_video(frames, nframes=2)
