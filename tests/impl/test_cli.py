"""`qwen25vl generate` (impl/cli.py) on the tiny checkpoint: streams the same text as a direct call."""

import numpy as np
import torch
from PIL import Image
from qwen25vl.impl.cli import main
from qwen25vl.impl.model import Qwen25VL


def test_generate_streams_answer(tiny_checkpoint, tmp_path, capsys):
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


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 2 and "error:" in err and "nope" in err
