"""spec/media.py and media parts in build_inputs: source keys, URLs served by a local server, bombs, budgets,
per-part options, and the examples of the transformers Qwen2.5-VL documentation page (URLs served locally).

Expected values come by hand (the rules written out in the tests) or from qwen-vl-utils' own smart_resize.
"""

import base64
import http.server
import io
import math
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from qwen25vl.spec.chat import render_chat
from qwen25vl.spec.image import preprocess_image
from qwen25vl.spec.media import FetchLimits, fetch_url, part_source
from qwen25vl.spec.tokens import build_inputs, load_tokenizer
from qwen25vl.spec.video import Video, read_video, sample_frame_indices, sample_video

from tests.conftest import TOKENIZER_DIR

from .videos import load_qwen_vl_utils, lossless_video, pattern_frames


def png_bytes(array_or_image):
    buf = io.BytesIO()
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(buf, "PNG")
    return buf.getvalue()


IMAGE = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
IMAGE_PNG = png_bytes(IMAGE)
BOMB_PNG = png_bytes(Image.new("1", (12000, 12000)))  # ~17 KB, 144 M pixels decoded (issue 8)
VIDEO_FRAMES = pattern_frames(40, 56, 84)
VIDEO_MKV = lossless_video(VIDEO_FRAMES, 10)  # 4 s at 10 fps


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def send(self, code, body=b"", ctype="application/octet-stream", length=True, headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path == "/cat.png":
            self.send(200, IMAGE_PNG, "image/png")
        elif path == "/bomb.png":
            self.send(200, BOMB_PNG, "image/png")
        elif path == "/video.mkv":
            self.send(200, VIDEO_MKV, "video/x-matroska")
        elif path == "/slow.png":
            time.sleep(3)
            self.send(200, IMAGE_PNG, "image/png")
        elif path == "/page.html":
            self.send(200, b"<html><body>not an image</body></html>", "text/html")
        elif path == "/big":
            self.send(200, b"\0" * 300_000)
        elif path == "/big-unsized":
            self.send(200, b"\0" * 300_000, length=False)
        elif path == "/moved":
            self.send(302, headers=[("Location", "/cat.png")])
        elif path.startswith("/loop"):
            self.send(302, headers=[("Location", "/loop-b" if path == "/loop-a" else "/loop-a")])
        else:
            self.send(404, b"no such file", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def one(part, text="Describe."):
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def pixels(tok, part, **kw):
    return build_inputs(one(part), tokenizer=tok, **kw)


# ------------------------------------------------------------------------------------------------------
# fetching


def test_fetch_ok_and_redirect(server):
    assert fetch_url(f"{server}/cat.png") == IMAGE_PNG
    assert fetch_url(f"{server}/moved") == IMAGE_PNG


@pytest.mark.parametrize(
    "path, limits, message",
    [
        ("/slow.png", FetchLimits(timeout=0.5), r"could not be fetched: timed out after 0.5 s"),
        ("/nothing.png", FetchLimits(), r"could not be fetched: the server answered HTTP 404"),
        ("/big", FetchLimits(max_bytes=100_000), r"Content-Length is 300000 bytes, over the limit of 100000"),
        ("/big-unsized", FetchLimits(max_bytes=100_000), r"the body passed the limit of 100000 bytes"),
        ("/loop-a", FetchLimits(max_redirects=3), r"more than 3 redirects"),
    ],
)
def test_fetch_failures_name_url_and_reason(server, path, limits, message):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=message) as info:
        fetch_url(server + path, limits=limits, what="image")
    assert f"image URL '{server}{path}'" in str(info.value)
    assert time.monotonic() - t0 < 2.5


def test_unreachable_host_is_not_a_missing_file(tok):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError) as info:
        pixels(tok, {"type": "image", "url": f"http://127.0.0.1:{port}/cat.png"})
    text = str(info.value)
    assert "could not be fetched" in text and f":{port}/cat.png" in text
    assert "does not exist" not in text


def test_non_image_body_is_a_decode_error(server, tok):
    with pytest.raises(ValueError, match=r"\(url '.*/page.html'\): image bytes \(38 bytes\) could not be decoded"):
        pixels(tok, {"type": "image", "url": f"{server}/page.html"})


def test_url_equals_path_and_bytes(server, tok, tmp_path):
    path = tmp_path / "cat image.png"
    path.write_bytes(IMAGE_PNG)
    want = pixels(tok, {"type": "image", "image": str(path)})
    b64 = base64.b64encode(IMAGE_PNG).decode()
    for part in (
        {"type": "image", "url": f"{server}/cat.png"},
        {"type": "image", "image": f"{server}/cat.png"},
        {"type": "image", "path": str(path)},
        {"type": "image", "url": path.as_uri()},  # file:// with a percent-encoded space
        {"type": "image", "base64": b64},
        {"type": "image", "base64": "data:image/png;base64," + b64},
        {"type": "image", "url": "data:image/png;base64," + b64},
        {"type": "image_url", "image_url": {"url": f"{server}/cat.png"}},
        {"type": "image", "image": IMAGE_PNG},
    ):
        got = pixels(tok, part)
        assert torch.equal(got["pixel_values"], want["pixel_values"]), part
        assert torch.equal(got["input_ids"], want["input_ids"])


def test_video_by_url_path_and_bytes(server, tok, tmp_path):
    path = tmp_path / "video.mkv"
    path.write_bytes(VIDEO_MKV)
    want = pixels(tok, {"type": "video", "video": str(path)})
    for part in (
        {"type": "video", "url": f"{server}/video.mkv"},
        {"type": "video", "path": str(path)},
        {"type": "video", "url": path.as_uri()},
        {"type": "video", "base64": base64.b64encode(VIDEO_MKV).decode()},
        {"type": "video", "video": VIDEO_MKV},
    ):
        got = pixels(tok, part)
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"]), part


# ------------------------------------------------------------------------------------------------------
# which key wins


def test_key_precedence_and_ambiguity():
    assert part_source({"type": "image", "image": "a.png", "url": "a.png"}, "image", "p") == ("image", "a.png")
    assert part_source({"type": "image", "image": None, "path": "a.png"}, "image", "p") == ("path", "a.png")
    assert part_source({"type": "video", "url": "x", "path": "x"}, "video", "p") == ("url", "x")
    assert part_source({"type": "image"}, "image", "p") is None
    with pytest.raises(ValueError, match=r"p is ambiguous: it names its image twice, by 'url' and by 'path'"):
        part_source({"type": "image", "url": "file:///a.png", "path": "/b.png"}, "image", "p")
    with pytest.raises(ValueError, match=r"by 'video' and by 'url'"):
        part_source({"type": "video", "video": "a.mp4", "url": "http://x/b.mp4"}, "video", "p")


def test_part_errors_name_the_part(tok):
    with pytest.raises(ValueError, match=r"\['content'\]\[0\] is an image part with no 'image' / 'image_url' / 'url'"):
        pixels(tok, {"type": "image"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_pixel'\]"):
        pixels(tok, {"type": "image", "image": IMAGE, "max_pixel": 10})
    with pytest.raises(ValueError, match=r"must start with http://, https://, file:// or data:; for a local file"):
        pixels(tok, {"type": "image", "url": "cat.png"})
    with pytest.raises(ValueError, match=r"image path 'nope.png' does not exist"):
        pixels(tok, {"type": "image", "path": "nope.png"})
    with pytest.raises(ValueError, match=r"is not valid base64"):
        pixels(tok, {"type": "image", "base64": "not base64!"})


# ------------------------------------------------------------------------------------------------------
# decompression bombs (issue 8 §5)


def test_bomb_refused_by_default_everywhere(server, tok, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(BOMB_PNG)
    b64 = base64.b64encode(BOMB_PNG).decode()
    for part in (
        {"type": "image", "path": str(path)},
        {"type": "image", "url": f"{server}/bomb.png"},
        {"type": "image", "base64": b64},
        {"type": "image", "image": BOMB_PNG},
    ):
        with pytest.raises(
            ValueError, match=r"declares 12000x12000 = 144,000,000 pixels .* over the limit of 89,478,485"
        ):
            pixels(tok, part)
    with pytest.raises(ValueError, match="video frame 1: .* declares 12000x12000"):
        pixels(tok, {"type": "video", "video": [IMAGE_PNG, BOMB_PNG]})


def test_large_image_opt_in():
    big = png_bytes(Image.new("RGB", (1200, 1000)))
    with pytest.raises(ValueError, match="1,200,000 pixels .* over the limit of 1,000,000"):
        preprocess_image(big, max_decoded_pixels=1_000_000)
    _, grid = preprocess_image(big, max_decoded_pixels=None)
    assert grid.tolist() == [[1, 72, 86]]  # 1008 x 1204: round(1000/28)=36 -> 1008, round(1200/28)=43 -> 1204


# ------------------------------------------------------------------------------------------------------
# video memory budget, per-part options


def test_video_budget(tmp_path):
    path = tmp_path / "v.mkv"
    path.write_bytes(VIDEO_MKV)
    frame = 56 * 84 * 3
    # 4 s at 2 fps -> 8 sampled frames
    with pytest.raises(ValueError, match=rf"8 sampled frames of 84x56 need {8 * frame:,} bytes .* max_video_bytes"):
        sample_video(path, max_video_bytes=8 * frame - 1)
    assert sample_video(path, max_video_bytes=8 * frame).frames.shape == (8, 56, 84, 3)
    with pytest.raises(ValueError, match=rf"40 frames of 84x56 need {40 * frame:,} bytes"):
        read_video(path, max_video_bytes=40 * frame - 1)
    with pytest.raises(ValueError, match="3 frames of 84x56"):
        sample_video(list(VIDEO_FRAMES[:3]), max_video_bytes=frame)
    with pytest.raises(ValueError, match="4 sampled frames"):
        sample_video(Video(VIDEO_FRAMES, 10.0, 4.0), nframes=4, max_video_bytes=frame)


def test_sampled_decode_equals_full_decode(tmp_path):
    sampled = sample_video(VIDEO_MKV, fps=3.0)
    assert sampled.indices == tuple(sample_frame_indices(40, 10.0, fps=3.0))
    assert np.array_equal(sampled.frames, read_video(VIDEO_MKV).frames[list(sampled.indices)])
    assert np.array_equal(sampled.frames, VIDEO_FRAMES[list(sampled.indices)])  # lossless


def test_video_start_end_by_hand():
    # 40 frames at 10 fps; start 1.05 s -> ceil(10.5) = 11, end 3.0 s -> floor(30) = 30: 20 frames,
    # 20 / 10 * 2 fps = 4 frames at round(linspace(11, 30, 4)) = 11, 17.33 -> 17, 23.67 -> 24, 30.
    sampled = sample_video(VIDEO_MKV, video_start=1.05, video_end=3.0)
    assert sampled.indices == (11, 17, 24, 30)
    assert sampled.sampled_fps == 4 / 20 * 10
    assert np.array_equal(sampled.frames, VIDEO_FRAMES[[11, 17, 24, 30]])
    assert sample_video(VIDEO_MKV, video_end=100).indices == sample_video(VIDEO_MKV).indices  # clamped
    with pytest.raises(ValueError, match="select frames 30..30"):
        sample_video(VIDEO_MKV, video_start=3.0, video_end=3.0)


def test_resized_size_follows_qwen_vl_utils(tok):
    qvu = load_qwen_vl_utils()
    for rh, rw in ((280, 420), (100, 1000), (57, 83)):
        h, w = qvu.smart_resize(rh, rw, factor=28)
        got = pixels(tok, {"type": "image", "image": IMAGE, "resized_height": rh, "resized_width": rw})
        assert got["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
        got = pixels(tok, {"type": "video", "video": VIDEO_MKV, "resized_height": rh, "resized_width": rw})
        assert got["video_grid_thw"].tolist() == [[4, h // 14, w // 14]]
    with pytest.raises(ValueError, match="give both resized_height and resized_width"):
        pixels(tok, {"type": "image", "image": IMAGE, "resized_height": 280})


def test_per_part_options_override_the_call(tok):
    call = pixels(tok, {"type": "video", "video": VIDEO_MKV}, fps=1)
    part = pixels(tok, {"type": "video", "video": VIDEO_MKV, "fps": 1})
    dict_ = pixels(tok, {"type": "video", "video": VIDEO_MKV}, video_options={"fps": 1})
    # 4 s at 1 fps = 4 frames (also min_frames) -> grid t = 2, 2 frames per patch over 1 fps -> 2 s
    for got in (call, part, dict_):
        assert got["video_grid_thw"][0, 0] == 2 and got["second_per_grid_ts"].tolist() == [2.0]
    mixed = pixels(tok, {"type": "video", "video": VIDEO_MKV, "nframes": 12}, fps=1)  # the part's nframes wins
    assert mixed["video_grid_thw"][0, 0] == 6
    small = pixels(tok, {"type": "image", "image": IMAGE, "max_pixels": 28 * 28 * 4}, max_pixels=10**6)
    # 60 x 90 over 3136: beta = sqrt(5400 / 3136); floor(60 / beta / 28) = 1, floor(90 / beta / 28) = 2
    assert small["image_grid_thw"].tolist() == [[1, 2, 4]]


# ------------------------------------------------------------------------------------------------------
# the transformers documentation page, example by example (URLs served locally)


def test_doc_image_by_url(server, tiny_checkpoint, tmp_path):
    from qwen25vl.impl.model import Qwen25VL

    model = Qwen25VL.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": f"{server}/cat.png"},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    got = model.generate(messages, max_new_tokens=5)
    path = tmp_path / "cat.png"
    path.write_bytes(IMAGE_PNG)
    messages[0]["content"][0] = {"type": "image", "image": str(path)}
    assert got == model.generate(messages, max_new_tokens=5)


def test_doc_video_by_path_fps_1(tok, tmp_path):
    path = tmp_path / "video.mkv"
    path.write_bytes(VIDEO_MKV)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": str(path)},
                {"type": "text", "text": "What happened in the video?"},
            ],
        }
    ]
    inputs = build_inputs(conversation, tokenizer=tok, fps=1)
    n = 4  # floor(min(max(40 / 10 * 1, 4), 40) / 2) * 2
    side = (
        28 * math.ceil(math.sqrt(100352 / (56 * 84)) * 56 / 28),
        28 * math.ceil(math.sqrt(100352 / (56 * 84)) * 84 / 28),
    )
    assert inputs["video_grid_thw"].tolist() == [[n // 2, side[0] // 14, side[1] // 14]]
    assert inputs["second_per_grid_ts"].tolist() == [2 / (n / 40 * 10)]


def test_doc_mixed_conversation_add_vision_id(tok):
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}]},
        {"role": "assistant", "content": "I'm doing well, thank you for asking. How can I assist you today?"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Can you describe these images and video?"},
                {"type": "image"},
                {"type": "image"},
                {"type": "video"},
                {"type": "text", "text": "These are from my vacation."},
            ],
        },
        {
            "role": "assistant",
            "content": "I'd be happy to describe the images and video for you. Could you please provide more context about your vacation?",
        },
        {"role": "user", "content": "It was a trip to the mountains. Can you see the details in the images and video?"},
    ]
    expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing well, thank you for asking. How can I assist you today?<|im_end|>\n<|im_start|>user\nCan you describe these images and video?Picture 2: <|vision_start|><|image_pad|><|vision_end|>Picture 3: <|vision_start|><|image_pad|><|vision_end|>Video 1: <|vision_start|><|video_pad|><|vision_end|>These are from my vacation.<|im_end|>\n<|im_start|>assistant\nI'd be happy to describe the images and video for you. Could you please provide more context about your vacation?<|im_end|>\n<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and video?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(conversation, add_generation_prompt=True, add_vision_id=True) == expected
    inputs = build_inputs(conversation, [IMAGE, IMAGE_PNG, IMAGE], [VIDEO_MKV], tok, add_vision_id=True)
    text = tok.decode(inputs["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text.count("<|image_pad|>") == 3 * (4 * 6 // 4)  # grid (1, 4, 6) = 6 merged tokens each
    assert text.count("Picture 3: <|vision_start|>") == 1
    assert "Video 1: <|vision_start|><|video_pad|>" in text
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]] * 3


@pytest.mark.parametrize(
    "min_pixels, max_pixels, grid",
    [(224 * 224, 2048 * 2048, [1, 78, 138]), (256 * 28 * 28, 1024 * 28 * 28, [1, 48, 84])],
)
def test_doc_min_max_pixels(tok, min_pixels, max_pixels, grid):
    # 1080 x 1920: under 2048^2 it rounds to 1092 x 1932; over 1024*28*28 beta = sqrt(1080*1920/802816),
    # floor(1080 / beta / 28) = 24 -> 672, floor(1920 / beta / 28) = 42 -> 1176.
    image = np.zeros((1080, 1920, 3), np.uint8)
    inputs = pixels(tok, {"type": "image", "image": image}, min_pixels=min_pixels, max_pixels=max_pixels)
    assert inputs["image_grid_thw"].tolist() == [grid]
