"""render_chat against the official Jinja template (plain jinja2 and transformers' renderer)."""

import json
import os

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from qwen25vl.spec.chat import render_chat
from transformers.utils.chat_template_utils import render_jinja_template

from tests.conftest import TOKENIZER_DIR

with open(os.path.join(TOKENIZER_DIR, "chat_template.json"), encoding="utf-8") as f:
    TEMPLATE = json.load(f)["chat_template"]
JINJA = jinja2.Environment().from_string(TEMPLATE)


def jinja_plain(messages, **flags):
    return JINJA.render(messages=messages, **flags)


def jinja_transformers(messages, **flags):
    rendered, _ = render_jinja_template([messages], chat_template=TEMPLATE, **flags)
    return rendered[0]


# Text that stresses the renderer: ChatML markup typed by a user, Jinja syntax, newlines, CR, non-ASCII.
pieces = list("ab 12\n\r\t{}%#é中😀\u0301") + ["<|im_start|>", "<|image_pad|>", "{{ x }}", "{% if %}", "\r\n"]
texts = st.lists(st.sampled_from(pieces), max_size=12).map("".join)
# Every kind of part the template recognises, including the odd ones (type-only, image_url, mixed keys
# where the template's test order decides: image before video before text).
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda t: {"text": t}, texts),
    st.just({"type": "image"}),
    st.just({"type": "image", "image": "cat.png"}),
    st.just({"image": b"\x89PNG"}),
    st.just({"image_url": "http://x/cat.png"}),
    st.just({"type": "image_url", "image_url": {"url": "http://x/cat.png"}}),
    st.just({"type": "video"}),
    st.just({"video": "clip.mp4"}),
    st.just({"type": "video", "video": ["f0.png", "f1.png"]}),
    st.builds(lambda t: {"type": "text", "text": t, "image": "x.png"}, texts),  # image wins
    st.builds(lambda t: {"type": "video", "text": t}, texts),  # video wins
    st.builds(lambda t: {"type": "audio", "text": t}, texts),  # text (template only tests the key)
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), texts)
messages_st = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, st.lists(parts, max_size=5))}),
    max_size=5,
)
flags_st = st.fixed_dictionaries({"add_generation_prompt": st.booleans(), "add_vision_id": st.booleans()})


@given(messages_st, flags_st)
def test_equals_jinja_template(messages, flags):
    ours = render_chat(messages, **flags)
    assert ours == jinja_plain(messages, **flags)
    assert ours == jinja_transformers(messages, **flags)


def test_hand_written_example():
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Describe this image."}],
        },
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(messages, add_generation_prompt=True) == expected


def test_vision_ids_count_over_the_whole_conversation():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "video"}, {"image_url": "u"}]},
    ]
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    vid = "<|vision_start|><|video_pad|><|vision_end|>"
    expected = (
        "<|im_start|>system\nS<|im_end|>\n"
        f"<|im_start|>user\nPicture 1: {img}Video 1: {vid}Picture 2: {img}<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
        f"<|im_start|>user\nVideo 2: {vid}Picture 3: {img}<|im_end|>\n"
    )
    assert render_chat(messages, add_vision_id=True) == expected


def test_only_first_message_decides_default_system():
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    assert render_chat(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>system\nlate<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "messages, error, words",
    [
        ("hello", TypeError, "messages must be a list"),
        ({"role": "user", "content": "x"}, TypeError, "messages must be a list"),
        ([{"role": "user", "content": "x"}, "hi"], TypeError, "messages[1]"),
        ([{"content": "x"}], ValueError, "messages[0] has no 'role'"),
        ([{"role": "user"}], ValueError, "messages[0] has no 'content'"),
        ([{"role": 3, "content": "x"}], TypeError, "messages[0]['role']"),
        ([{"role": "user", "content": None}], TypeError, "messages[0]['content']"),
        ([{"role": "user", "content": {"type": "text", "text": "x"}}], TypeError, "messages[0]['content']"),
        ([{"role": "user", "content": b"x"}], TypeError, "messages[0]['content']"),
        ([{"role": "user", "content": ["x"]}], TypeError, "messages[0]['content'][0]"),
        (
            [{"role": "user", "content": [{"type": "text", "text": None}]}],
            TypeError,
            "messages[0]['content'][0]['text']",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "audio": "a.wav"}]},
            ],
            ValueError,
            "messages[1]['content'][1] has unknown content type 'audio'",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            ValueError,
            "messages[0]['content'][0] has unknown content type 'text'",
        ),
        ([{"role": "user", "content": [{}]}], ValueError, "unknown content type None"),
    ],
)
def test_bad_input(messages, error, words):
    with pytest.raises(error) as info:
        render_chat(messages)
    assert words in str(info.value)


def test_unknown_part_is_what_jinja_would_drop():
    # The deviation, pinned: Jinja renders the unknown part as nothing; we raise.
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]
    assert "audio" not in jinja_plain(messages)
    with pytest.raises(ValueError, match="unknown content type 'audio'"):
        render_chat(messages)
