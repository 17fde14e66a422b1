"""Tokenizer, placeholder expansion and batch inputs, checked against transformers' Qwen2.5-VL processor."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from qwen25vl.spec.tokens import build_inputs, decode, expand_vision_tokens, load_tokenizer, save_tokenizer
from transformers import AutoTokenizer, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils.chat_template_utils import render_jinja_template

from tests.conftest import MODEL_CONFIG_DIR, TOKENIZER_DIR

# ---------------------------------------------------------------------------------------------
# Tokenizers, loaded once per module (each load takes about a second).


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder with vocab.json + merges.txt + tokenizer_config.json, and one with our tokenizer.json."""
    bpe = tmp_path_factory.mktemp("bpe")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), bpe / name)
    js = tmp_path_factory.mktemp("json")
    save_tokenizer(load_tokenizer(str(bpe)), str(js))
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer_config.json"), js / "tokenizer_config.json")
    return str(bpe), str(js)


@pytest.fixture(scope="module")
def toks(folders):
    bpe, js = folders
    return {
        "ours_bpe": load_tokenizer(bpe),
        "ours_json": load_tokenizer(js),
        "hf_bpe": AutoTokenizer.from_pretrained(bpe),  # transformers builds its own BPE from the same files
        "hf_json": AutoTokenizer.from_pretrained(js),  # transformers reads the tokenizer.json we wrote
    }


SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<tool_call>",
    "<|fim_pad|>",
    "<|im_start",
    "|>",
]
PIECES = (
    SPECIALS
    + list("aZ é中文日本語한국어عربي😀👍🏽\u0301\u00a0\u3000\t\n\r 0123456789.,!?'\"-_/\\()[]{}<>|")
    + ["\r\n", "   ", "\n\n", "'s", "'LL", "'re", "Hello", " world", "e\u0301", "ﬁ", "１２３", "x²", "--->"]
)
texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=25).map("".join),
    st.text(max_size=30),
)


@given(texts)
def test_ids_equal_transformers(toks, text):
    expected = toks["hf_bpe"].encode(text, add_special_tokens=False)
    assert toks["ours_bpe"].encode(text, add_special_tokens=False).ids == expected
    assert toks["ours_json"].encode(text, add_special_tokens=False).ids == expected
    assert toks["hf_json"].encode(text, add_special_tokens=False) == expected


@given(st.lists(st.integers(0, 151664), max_size=20), st.booleans())
def test_decode_equals_transformers(toks, ids, skip):
    expected = toks["hf_bpe"].decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert decode(toks["ours_bpe"], ids, skip_special_tokens=skip) == expected
    assert decode(toks["ours_json"], torch.tensor(ids, dtype=torch.int64), skip_special_tokens=skip) == expected


def test_known_ids(toks):
    # Anchors from SOURCE.md (verified there against three tokenizer builds).
    tok = toks["ours_bpe"]
    assert tok.encode("Hello world").ids == [9707, 1879]
    assert tok.encode("你好，世界！").ids == [108386, 3837, 99489, 6313]
    assert tok.get_vocab_size() == 151665
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.token_to_id(t) == 151643 + i
    assert tok.token_to_id("<|image_pad|>") == 151655 and tok.token_to_id("<|file_sep|>") == 151664
    assert tok.encode("12345").ids == [tok.token_to_id(c) for c in "12345"]  # one token per digit


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"lacks \['vocab.json', 'merges.txt'\]"):
        load_tokenizer(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# expand_vision_tokens, by hand

IMG, VID = "<|image_pad|>", "<|video_pad|>"


def test_expand_by_hand():
    texts = ["a" + IMG + "b" + VID + "c", IMG + IMG, "none"]
    out = expand_vision_tokens(texts, torch.tensor([[1, 4, 4], [1, 2, 6], [1, 2, 2]]), [[2, 4, 4]])
    # 1*4*4/4 = 4, 1*2*6/4 = 3, 1*2*2/4 = 1; video 2*4*4/4 = 8
    assert out == ["a" + IMG * 4 + "b" + VID * 8 + "c", IMG * 3 + IMG * 1, "none"]
    assert expand_vision_tokens(["x" + IMG], [[1, 8, 8]], None, merge_size=4) == ["x" + IMG * 4]
    assert expand_vision_tokens(["plain"], None, None) == ["plain"]


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)), max_size=6), st.data())
def test_expand_counts(grids, data):
    # Scatter the pads over 1..3 rows; the i-th pad in reading order must get grid i's count.
    grids = [(t, 2 * h, 2 * w) for t, h, w in grids]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(grids)), min_size=2, max_size=2)))
    rows = [grids[: cuts[0]], grids[cuts[0] : cuts[1]], grids[cuts[1] :]]
    texts = ["#".join(IMG for _ in r) + "." for r in rows]
    out = expand_vision_tokens(texts, grids or None, None)
    for r, text in zip(rows, out):
        runs = [len(s) // len(IMG) for s in text[:-1].split("#")] if r else []
        assert runs == [t * h * w // 4 for t, h, w in r]


@pytest.mark.parametrize(
    "texts, image_grid, video_grid, error, words",
    [
        (
            [IMG, IMG],
            [[1, 2, 2]],
            None,
            ValueError,
            "more pads than grids: the texts hold 2 <|image_pad|> but image_grid_thw has 1",
        ),
        (
            [IMG],
            [[1, 2, 2], [1, 2, 2]],
            None,
            ValueError,
            "fewer pads than grids: the texts hold 1 <|image_pad|> but image_grid_thw has 2",
        ),
        ([VID + VID + VID], None, [[1, 2, 2]], ValueError, "more pads than grids: the texts hold 3 <|video_pad|>"),
        (["x"], None, [[1, 2, 2]], ValueError, "fewer pads than grids: the texts hold 0 <|video_pad|>"),
        (
            [IMG],
            [[1, 3, 2]],
            None,
            ValueError,
            "image_grid_thw[0] = [1, 3, 2]: h and w must be multiples of merge_size 2",
        ),
        ([IMG], [[1, 2]], None, ValueError, "image_grid_thw must have shape [k, 3]"),
        ([VID], None, [[0, 2, 2]], ValueError, "video_grid_thw[0] = [0, 2, 2] must be positive"),
        (IMG, [[1, 2, 2]], None, TypeError, "texts must be a list of str"),
        ([IMG, 3], [[1, 2, 2]], None, TypeError, "texts must be a list of str"),
    ],
)
def test_expand_bad_input(texts, image_grid, video_grid, error, words):
    with pytest.raises(error) as info:
        expand_vision_tokens(texts, image_grid, video_grid)
    assert words in str(info.value)


# ---------------------------------------------------------------------------------------------
# build_inputs against Qwen2_5_VLProcessor (PIL image processor; the video processor needs torchvision)

with open(os.path.join(TOKENIZER_DIR, "chat_template.json"), encoding="utf-8") as f:
    TEMPLATE = json.load(f)["chat_template"]


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor, whose transformers class imports torchvision."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def processor(toks):
    with open(os.path.join(MODEL_CONFIG_DIR, "preprocessor_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    kwargs = {
        k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class", "min_pixels", "max_pixels")
    }
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": cfg["min_pixels"], "longest_edge": cfg["max_pixels"]}, **kwargs
    )
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=toks["hf_bpe"], chat_template=TEMPLATE)


def hf_inputs(processor, batch, images):
    texts = [render_jinja_template([conv], chat_template=TEMPLATE, add_generation_prompt=True)[0][0] for conv in batch]
    return processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")


def random_image(rng, max_side=120):
    h, w = rng.integers(8, max_side, size=2)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@st.composite
def batches(draw):
    """1..3 conversations: optional system, 1..3 turns, text and image parts in any order."""
    batch = []
    for _ in range(draw(st.integers(1, 3))):
        conv = [{"role": "system", "content": "Be brief."}] if draw(st.booleans()) else []
        for turn in range(draw(st.integers(1, 3))):
            parts = draw(st.lists(st.sampled_from(["image", "text"]), min_size=1, max_size=4))
            content = [
                {"type": "image"}
                if p == "image"
                else {"type": "text", "text": draw(st.sampled_from(["Describe.", " and ", "中文\n", "12 pts"]))}
                for p in parts
            ]
            conv.append({"role": "user", "content": content})
            if draw(st.booleans()):
                conv.append({"role": "assistant", "content": "A cat."})
        batch.append(conv)
    return batch


@given(batches(), st.integers(0, 2**32 - 1))
def test_build_inputs_equals_processor(toks, processor, batch, seed):
    rng = np.random.default_rng(seed)
    n_images = sum(
        p.get("type") == "image" for conv in batch for m in conv if isinstance(m["content"], list) for p in m["content"]
    )
    images = [random_image(rng) for _ in range(n_images)]
    ours = build_inputs(batch, images, None, toks["ours_bpe"])
    ref = hf_inputs(processor, batch, images)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert ours["input_ids"].dtype == ours["attention_mask"].dtype == torch.int64
    if images:
        assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
        # Same rows in the same order (the image preprocessing itself is tested in test_image.py).
        assert torch.allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    else:
        assert ours["pixel_values"] is None and ours["image_grid_thw"] is None
    assert ours["pixel_values_videos"] is None and ours["video_grid_thw"] is None and ours["second_per_grid_ts"] is None


def test_left_padded_batch_mid_prompt_images(toks, processor):
    # Fixed sizes so the token counts are known by hand: 56x56 -> grid (1,4,4) -> 4 tokens,
    # 56x112 (h x w) -> grid (1,4,8) -> 8 tokens; both are inside the pixel budget, so not resized.
    a = Image.new("RGB", (56, 56), (200, 10, 10))
    b = Image.new("RGB", (112, 56), (10, 200, 10))
    batch = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image", "image": a},
                    {"type": "text", "text": " with "},
                    {"type": "image", "image": np.asarray(b)},
                    {"type": "text", "text": "."},
                ],
            }
        ],
        [{"role": "user", "content": "Hi"}],
    ]
    ours = build_inputs(batch, None, None, toks["ours_bpe"])  # media taken from the parts
    ref = hf_inputs(processor, batch, [a, b])
    assert torch.equal(ours["input_ids"], ref["input_ids"]) and torch.equal(
        ours["attention_mask"], ref["attention_mask"]
    )
    assert ours["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    ids = ours["input_ids"]
    assert (ids[0] == 151655).sum() == 4 + 8
    n_pad = int((ours["attention_mask"][1] == 0).sum())
    assert n_pad > 0 and (ids[1, :n_pad] == 151643).all() and ours["attention_mask"][1, n_pad:].all()
    assert ids[0].tolist()[-3:] == [151644, 77091, 198]  # every row ends with "<|im_start|>assistant\n"
    assert ids[1].tolist()[-3:] == [151644, 77091, 198]
    # A single conversation gives the same row as a batch of one.
    single = build_inputs(batch[1], None, None, toks["ours_bpe"])
    assert single["input_ids"].tolist() == [ids[1, n_pad:].tolist()]


def test_video_token_count_by_hand(toks):
    # transformers' video processor needs torchvision (not installed), so the count is checked by hand:
    # 4 frames of 56x56 at a 56*56 budget -> grid (4/2, 56/14, 56/14) = (2, 4, 4) -> 2*4*4/4 = 8 tokens.
    frames = [np.full((56, 56, 3), 30 * k, dtype=np.uint8) for k in range(4)]
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames},
                {"type": "image"},
                {"type": "text", "text": "What changes?"},
            ],
        }
    ]
    image = Image.new("RGB", (56, 56))
    out = build_inputs(
        conv, [image], None, toks["ours_bpe"], video_options={"min_pixels": 56 * 56, "max_pixels": 56 * 56}
    )
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert out["pixel_values_videos"].shape == (2 * 4 * 4, 1176)
    assert out["second_per_grid_ts"].dtype == torch.float64 and out["second_per_grid_ts"].shape == (1,)
    ids = out["input_ids"][0].tolist()
    start = ids.index(151652)  # <|vision_start|>, the video's (it comes first)
    assert ids[start + 1 : start + 10] == [151656] * 8 + [151653]
    assert ids.count(151655) == 4 and out["image_grid_thw"].tolist() == [[1, 4, 4]]


@pytest.mark.parametrize(
    "conversations, images, videos, error, words",
    [
        (
            [{"role": "user", "content": [{"type": "image"}]}],
            [],
            None,
            ValueError,
            "images has 0 items but the conversations have 1 image parts",
        ),
        (
            [{"role": "user", "content": "x"}],
            ["a.png"],
            None,
            ValueError,
            "images has 1 items but the conversations have 0 image parts",
        ),
        (
            [{"role": "user", "content": [{"video": "v.mp4"}]}],
            None,
            [],
            ValueError,
            "videos has 0 items but the conversations have 1 video parts",
        ),
        (
            [{"role": "user", "content": [{"type": "image"}]}],
            None,
            None,
            ValueError,
            "conversations[0][0]['content'][0] is an image part with no",
        ),
        ([{"role": "user", "content": "<|image_pad|> typed"}], None, None, ValueError, "more pads than grids"),
        (
            [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
            None,
            None,
            ValueError,
            "conversations[0]: messages[0]['content'][0] has unknown content type 'audio'",
        ),
        (
            [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}, "hi"]],
            None,
            None,
            TypeError,
            "conversations[1]: messages[1] must be a dict",
        ),
        ([{"role": "user", "content": "x"}, "hi"], None, None, TypeError, "messages[1] must be a dict"),
        (
            [[{"role": "user", "content": "x"}], "hi"],
            None,
            None,
            TypeError,
            "conversations[1] must be a list of message dicts",
        ),
        ([], None, None, ValueError, "conversations is empty"),
        ("hello", None, None, TypeError, "conversations must be a list"),
        ([{"role": "user", "content": [{"type": "image"}]}], "a.png", None, TypeError, "images must be a list"),
    ],
)
def test_build_inputs_bad_input(toks, conversations, images, videos, error, words):
    with pytest.raises(error) as info:
        build_inputs(conversations, images, videos, toks["ours_bpe"])
    assert words in str(info.value)


def test_build_inputs_rejects_foreign_tokenizer_and_options(toks):
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer"):
        build_inputs([{"role": "user", "content": "x"}], None, None, toks["hf_bpe"])
    with pytest.raises(TypeError, match="video_options must be a dict"):
        build_inputs([{"role": "user", "content": "x"}], None, None, toks["ours_bpe"], video_options=2.0)


def test_preprocessing_errors_name_the_item(toks):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    with pytest.raises(TypeError, match=r"^images\[1\]: "):
        build_inputs(conv, [Image.new("RGB", (56, 56)), 3], None, toks["ours_bpe"])
