"""The Qwen2.5-VL-Instruct chat template, written out as plain Python.

The official template (chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct, a Jinja string) turns a
conversation into ChatML:

    <|im_start|>{role}\\n{content}<|im_end|>\\n           one block per message
    <|im_start|>assistant\\n                             only with add_generation_prompt

When the first message is not a system message, a default system block "You are a helpful
assistant." comes first. String content is copied verbatim. List content is a sequence of parts,
concatenated with no separator:

    image part  -> [Picture k: ]<|vision_start|><|image_pad|><|vision_end|>
    video part  -> [Video k: ]<|vision_start|><|video_pad|><|vision_end|>
    text part   -> its text

The "Picture k: " / "Video k: " prefixes appear only with add_vision_id; k counts images (videos)
over the whole conversation from 1. Each pad is one placeholder; spec.tokens.expand_vision_tokens
later widens it to the item's token count.

Where the template is silent we are loud. Jinja renders a part that is none of image, video or text
as nothing, a missing role as an empty string and text=None as "None"; here those raise, so a typo
in a part's type can never drop an image from the prompt unnoticed. On every input that does not
raise, the output equals the Jinja rendering byte for byte (tests/spec/test_chat.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def part_kind(part, *, where: str = "part") -> str:
    """Classify one content part as "image", "video" or "text", in the template's order.

    The template tests, in this order: image if type == "image" or the part has a key "image" or
    "image_url"; video if type == "video" or it has a key "video"; text if it has a key "text".
    So {"type": "text", "image": x} is an image and {"type": "audio", "text": "x"} is text.
    `where` names the part in error messages.
    """
    if not isinstance(part, Mapping):
        raise TypeError(
            f"{where} must be a dict such as {{'type': 'text', 'text': ...}}, got {type(part).__name__}: {part!r:.80}"
        )
    kind = part.get("type")
    if kind == "image" or "image" in part or "image_url" in part:
        return "image"
    if kind == "video" or "video" in part:
        return "video"
    if "text" in part:
        return "text"
    # The Jinja template would silently render nothing here; we refuse instead (module docstring).
    raise ValueError(
        f"{where} has unknown content type {kind!r} and keys {sorted(map(str, part))}: "
        "expected type 'image' / 'video' or a key 'image', 'image_url', 'video' or 'text'"
    )


def check_messages(messages) -> None:
    """Raise TypeError / ValueError naming the message (and part) that the template cannot render."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}: {message!r:.80}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r} key (keys: {sorted(map(str, message))})")
        if not isinstance(message["role"], str):
            raise TypeError(
                f"messages[{i}]['role'] must be a str, got {type(message['role']).__name__}: {message['role']!r:.80}"
            )
        content = message["content"]
        if isinstance(content, str):
            continue
        if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
            raise TypeError(
                f"messages[{i}]['content'] must be a str or a list of parts, got {type(content).__name__}: {content!r:.80}"
            )
        for j, part in enumerate(content):
            where = f"messages[{i}]['content'][{j}]"
            if part_kind(part, where=where) == "text" and not isinstance(part["text"], str):
                raise TypeError(
                    f"{where}['text'] must be a str, got {type(part['text']).__name__}: {part['text']!r:.80}"
                )


def render_chat(messages, *, add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
    """Render a conversation with the Qwen2.5-VL-Instruct chat template.

    messages: list of {"role": str, "content": str | list[part]}; a part is a dict (part_kind).
    Returns the prompt string, one `<|image_pad|>` / `<|video_pad|>` per image / video part.
    """
    check_messages(messages)
    out = []
    n_images = n_videos = 0  # counters run over the whole conversation, not per message
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            for part in content:
                kind = part_kind(part)
                if kind == "image":
                    n_images += 1
                    out.append((f"Picture {n_images}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
                elif kind == "video":
                    n_videos += 1
                    out.append((f"Video {n_videos}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
                else:
                    out.append(part["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
