"""`qwen25vl generate` (impl/cli.py) on the tiny checkpoint: streams the same text as a direct call."""

import numpy as np
import pytest
import torch
from PIL import Image
from qwen25vl.impl.cli import main
from qwen25vl.impl.model import Qwen25VL


@pytest.mark.parametrize("chunk", [[], ["--prefill-chunk", "7"]])
def test_generate_streams_answer(tiny_checkpoint, tmp_path, capsys, chunk):
    """The same text as a direct call, with the prompt at once or prefilled 7 tokens at a time (boundaries
    inside the image's span)."""
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype("uint8")).save(img)
    rc = main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--image",
            str(img),
            "--prompt",
            "Describe it.",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
            *chunk,
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "loading weights" in err and "prompt tokens" in err
    model = Qwen25VL.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    cfg = model.config
    expected = model.generate(
        [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "Describe it."}]}],
        max_new_tokens=6,
        eos_token_id=[cfg.eos_token_id, cfg.pad_token_id],
    )
    assert out == expected + "\n"


def test_a_bad_prefill_chunk_is_refused_before_loading(tmp_path, capsys):
    rc = main(["--checkpoint", str(tmp_path / "none"), "--prompt", "hi", "--prefill-chunk", "0"])
    assert rc == 2 and "--prefill-chunk must be >= 1, got 0" in capsys.readouterr().err


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 2 and "error:" in err and "nope" in err


# ---------------------------------------------------------------------------------------------------
# media are checked before the checkpoint is read (issue 8 §5)


def _run_module(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "qwen25vl", "generate", *args], capture_output=True, text=True, timeout=120
    )


def test_missing_image_fails_before_the_checkpoint(tmp_path):
    done = _run_module(
        "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--image", str(tmp_path / "cat.jpg"), "--prompt", "hi"
    )
    assert done.returncode == 2, done.stderr
    assert "cat.jpg' does not exist or is not a file" in done.stderr
    assert "no-such-checkpoint" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_media_errors_come_before_a_broken_checkpoint(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # ~17 KB, 144 M pixels
    rc = main(["--checkpoint", str(broken), "--image", str(bomb), "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "declares 12000x12000" in err and "--allow-large-images" in err
    assert "config.json" not in err

    from tests.spec.videos import lossless_video, pattern_frames

    video = tmp_path / "v.mkv"
    video.write_bytes(lossless_video(pattern_frames(20, 56, 84), 10))
    rc = main(["--checkpoint", str(broken), "--video", str(video), "--max-video-bytes", "1000", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "over the budget of 1,000 bytes (max_video_bytes)" in err and "config.json" not in err

    rc = main(
        ["--checkpoint", str(broken), "--image", "http://127.0.0.1:9/x.png", "--fetch-timeout", "2", "--prompt", "hi"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "could not be fetched" in err and "does not exist" not in err

    rc = main(["--checkpoint", str(broken), "--fps", "1", "--nframes", "4", "--prompt", "hi"])
    assert rc == 2 and "not both" in capsys.readouterr().err


def test_progress_is_line_based_off_terminal_and_answer_ends_with_newline(tiny_checkpoint, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(img)
    args = ["--checkpoint", str(tiny_checkpoint), "--image", img.as_uri(), "--prompt", "Hi", "--device", "cpu"]
    rc = main(args + ["--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "\r" not in err
    lines = err.splitlines()
    assert any(line.startswith("loading weights") for line in lines) and all(line.strip() for line in lines)
    assert out.endswith("\n")
