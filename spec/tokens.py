"""From conversations and media to model inputs: tokenizer, placeholder expansion, batching.

Qwen2.5-VL's tokenizer is Qwen2's byte-level BPE: NFC normalisation, a regex split into words,
digits and punctuation runs, GPT-2's byte-to-unicode map, then 151,387 merges over 151,643 regular
tokens; 22 added tokens (151643..151664, `<|endoftext|>` ... `<|file_sep|>`) are matched verbatim
before BPE, even when a user types them inside text. No BOS/EOS is ever added.

A rendered prompt holds one `<|image_pad|>` per image (`<|video_pad|>` per video). The vision tower
turns an item of grid (t, h, w) patches into t*h*w / merge_size**2 tokens, so each pad is widened to
that many copies before tokenizing: the i-th pad of the batch (row 0 left to right, then row 1, ...)
takes the i-th grid. Images and videos are two independent streams.

Rows are LEFT padded with `<|endoftext|>` (151643) so that every row's last token sits at the same
position, which batched greedy decoding needs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .chat import check_messages, part_kind, render_chat
from .image import MAX_DECODED_PIXELS, preprocess_image
from .media import FetchLimits, part_options, part_source, resolve
from .mrope import check_grid_thw
from .video import preprocess_video

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
PAD_TOKEN_ID = 151643  # <|endoftext|>
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

# Qwen2's pre-tokenizer: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newline runs, and whitespace that keeps its last space for the next word.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _bpe_from_vocab_merges(folder: str) -> Tokenizer:
    """Byte-level BPE from vocab.json + merges.txt, with the added tokens of tokenizer_config.json."""
    config_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        # Without it <|im_start|> etc. would silently become BPE pieces; refuse instead.
        raise FileNotFoundError(
            f"tokenizer folder {folder!r} has vocab.json + merges.txt but no tokenizer_config.json (it lists the added tokens)"
        )
    vocab, merges = BPE.read_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok = Tokenizer(
        BPE(
            vocab,
            merges,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    with open(config_path, encoding="utf-8") as f:
        added = json.load(f).get("added_tokens_decoder", {})
    # Added in id order, each one takes the next free id; check it is the id the config says.
    for sid, t in sorted(added.items(), key=lambda kv: int(kv[0])):
        token = AddedToken(
            t["content"],
            single_word=t.get("single_word", False),
            lstrip=t.get("lstrip", False),
            rstrip=t.get("rstrip", False),
            normalized=t.get("normalized", False),
            special=t.get("special", False),
        )
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(t["content"]) != int(sid):
            raise ValueError(
                f"{config_path}: added token {t['content']!r} should have id {sid} but got "
                f"{tok.token_to_id(t['content'])} (added tokens must follow the vocabulary without gaps)"
            )
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer from a folder (or a tokenizer.json file).

    A folder with tokenizer.json is read as is; otherwise it needs vocab.json + merges.txt +
    tokenizer_config.json (for the added tokens), built as described in the module docstring.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".json"):
        return Tokenizer.from_file(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path!r} is neither a folder nor a tokenizer.json file")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    missing = [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {path!r} has no tokenizer.json and lacks {missing}")
    return _bpe_from_vocab_merges(path)


def save_tokenizer(tokenizer: Tokenizer, folder: str) -> str:
    """Write `tokenizer` as folder/tokenizer.json (which load_tokenizer reads back); return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tokenizer.save(path)
    return path


def decode(tokenizer: Tokenizer, ids, *, skip_special_tokens: bool = False) -> str:
    """Token ids [L] (list or 1-D tensor) -> text; invalid UTF-8 byte runs become U+FFFD."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode takes one row of ids [L], got a tensor of shape {tuple(ids.shape)}")
        ids = ids.tolist()
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------
# Placeholder expansion


def expand_vision_tokens(texts: list[str], image_grid_thw, video_grid_thw, *, merge_size: int = 2) -> list[str]:
    """Widen each pad to its item's token count.

    texts: B strings. image_grid_thw [n_img, 3], video_grid_thw [n_vid, 3] (or None).
    Returns B strings where the i-th `<|image_pad|>` of the batch is repeated t*h*w / merge_size**2
    times for the i-th image grid (videos likewise). Pads typed inside user text count too.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    streams = {
        IMAGE_PAD: [] if image_grid_thw is None else check_grid_thw(image_grid_thw, merge_size, "image_grid_thw"),
        VIDEO_PAD: [] if video_grid_thw is None else check_grid_thw(video_grid_thw, merge_size, "video_grid_thw"),
    }
    counts = {pad: sum(t.count(pad) for t in texts) for pad in streams}
    for pad, grids in streams.items():
        name = "image_grid_thw" if pad == IMAGE_PAD else "video_grid_thw"
        if counts[pad] > len(grids):
            raise ValueError(
                f"more pads than grids: the texts hold {counts[pad]} {pad} but {name} has {len(grids)} rows"
            )
        if counts[pad] < len(grids):
            raise ValueError(
                f"fewer pads than grids: the texts hold {counts[pad]} {pad} but {name} has {len(grids)} rows"
            )

    used = {IMAGE_PAD: 0, VIDEO_PAD: 0}
    splitter = re.compile(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})")

    def widen(match: re.Match) -> str:
        pad = match.group(0)
        t, h, w = streams[pad][used[pad]]
        used[pad] += 1
        return pad * (t * h * w // merge_size**2)

    return [splitter.sub(widen, text) for text in texts]  # sub walks left to right, row by row


# ---------------------------------------------------------------------------------------------
# Batch inputs


def _as_batch(conversations) -> list:
    """One conversation (list of message dicts) or a list of them -> list of conversations."""
    if isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Sequence):
        raise TypeError(
            f"conversations must be a list of messages or a list of such lists, got {type(conversations).__name__}"
        )
    if len(conversations) == 0:
        raise ValueError("conversations is empty: give one conversation (a list of messages) or a list of them")
    if any(isinstance(m, Mapping) for m in conversations):  # one conversation; check_messages names a bad message
        return [conversations]
    for b, conv in enumerate(conversations):
        if isinstance(conv, (str, bytes, Mapping)) or not isinstance(conv, Sequence):
            raise TypeError(
                f"conversations[{b}] must be a list of message dicts, got {type(conv).__name__}: {conv!r:.80}"
            )
    return list(conversations)


def _vision_parts(batch: list, kind: str) -> list[tuple[str, Mapping]]:
    """Every part of `kind` ("image"/"video") in batch order, with a name for error messages."""
    found = []
    for b, conv in enumerate(batch):
        for i, message in enumerate(conv):
            if isinstance(message["content"], str):
                continue
            for j, part in enumerate(message["content"]):
                if part_kind(part) == kind:
                    found.append((f"conversations[{b}][{i}]['content'][{j}]", part))
    return found


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 90 else text[:60] + "..." + text[-20:]


def _media(parts: list, given, kind: str) -> list[tuple[str, str, object, dict]]:
    """Pair each vision part with (name, source key, value, per-part options): the value from the separate
    list when given (the list wins over the parts' own keys), else from the part (spec/media.py rules)."""
    listname = kind + "s"
    options = [part_options(part, kind, where) for where, part in parts]
    if given is not None:
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise TypeError(
                f"{listname} must be a list (one entry per {kind} part, in order of appearance), got {type(given).__name__}"
            )
        if len(given) != len(parts):
            raise ValueError(f"{listname} has {len(given)} items but the conversations have {len(parts)} {kind} parts")
        return [(f"{listname}[{k}]", kind, item, opts) for k, (item, opts) in enumerate(zip(given, options))]
    out = []
    for (where, part), opts in zip(parts, options):
        found = part_source(part, kind, where)
        if found is None:
            keys = " / ".join(
                map(
                    repr,
                    ("image", "image_url", "url", "path", "base64")
                    if kind == "image"
                    else ("video", "url", "path", "base64"),
                )
            )
            raise ValueError(
                f"{where} is {'an image' if kind == 'image' else 'a video'} part with no {keys} value, "
                f"and no {listname} list was given"
            )
        key, value = found
        label = f"{where} ({key} {_short(value)})" if isinstance(value, (str, os.PathLike)) else where
        out.append((label, key, value, opts))
    return out


def _preprocess_all(items: list, fn, options: Mapping, kind: str, fetch: FetchLimits) -> list[tuple]:
    """Resolve and preprocess each item with the call's options updated by the part's, naming the item in
    any error. A part that sets fps or nframes replaces both of the call's (they exclude each other)."""
    results = []
    for where, key, item, part_opts in items:
        merged = dict(options)
        if "fps" in part_opts or "nframes" in part_opts:
            merged.pop("fps", None)
            merged.pop("nframes", None)
        merged.update(part_opts)
        try:
            results.append(fn(resolve(item, key=key, kind=kind, limits=fetch), **merged))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from e
    return results


def _batch_checked(conversations) -> list:
    batch = _as_batch(conversations)
    for b, conv in enumerate(batch):
        try:
            check_messages(conv)
        except (TypeError, ValueError) as e:
            raise type(e)(f"conversations[{b}]: {e}") from e
    return batch


def prepare_media(
    conversations,
    images=None,
    videos=None,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    fps: float | None = None,
    nframes: int | None = None,
    video_options: Mapping | None = None,
    max_decoded_pixels: int | None = MAX_DECODED_PIXELS,
    fetch: FetchLimits | None = None,
) -> dict:
    """Every image and video of a batch, loaded and preprocessed (the media half of build_inputs).

    Takes build_inputs' arguments (see there) and returns pixel_values float32 [P_img, 1176] | None,
    image_grid_thw int64 [n_img, 3] | None, pixel_values_videos float32 [P_vid, 1176] | None,
    video_grid_thw int64 [n_vid, 3] | None, second_per_grid_ts float64 [n_vid] | None. Run it first to
    check media (paths, URLs, sizes, budgets) before anything expensive; pass the result as build_inputs(media=).
    """
    if video_options is not None and not isinstance(video_options, Mapping):
        raise TypeError(
            f"video_options must be a dict of preprocess_video keyword arguments, got {type(video_options).__name__}"
        )
    if fetch is not None and not isinstance(fetch, FetchLimits):
        raise TypeError(f"fetch must be a spec.media.FetchLimits, got {type(fetch).__name__}")
    fetch = fetch or FetchLimits()
    batch = _batch_checked(conversations)

    image_opts = {"max_decoded_pixels": max_decoded_pixels}
    image_opts.update({k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None})
    video_opts = {"max_decoded_pixels": max_decoded_pixels}
    video_opts.update({k: v for k, v in (("fps", fps), ("nframes", nframes)) if v is not None})
    video_opts.update(video_options or {})
    imgs = _preprocess_all(
        _media(_vision_parts(batch, "image"), images, "image"), preprocess_image, image_opts, "image", fetch
    )
    vids = _preprocess_all(
        _media(_vision_parts(batch, "video"), videos, "video"), preprocess_video, video_opts, "video", fetch
    )

    def cat(results, i, dtype):
        return torch.cat([torch.as_tensor(r[i], dtype=dtype).reshape(-1, r[i].shape[-1]) for r in results])

    return {
        "pixel_values": cat(imgs, 0, torch.float32) if imgs else None,
        "image_grid_thw": cat(imgs, 1, torch.int64) if imgs else None,
        "pixel_values_videos": cat(vids, 0, torch.float32) if vids else None,
        "video_grid_thw": cat(vids, 1, torch.int64) if vids else None,
        "second_per_grid_ts": torch.tensor([float(r[2]) for r in vids], dtype=torch.float64) if vids else None,
    }


def build_inputs(
    conversations,
    images=None,
    videos=None,
    tokenizer: Tokenizer | None = None,
    *,
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    fps: float | None = None,
    nframes: int | None = None,
    video_options: Mapping | None = None,
    max_decoded_pixels: int | None = MAX_DECODED_PIXELS,
    fetch: FetchLimits | None = None,
    media: Mapping | None = None,
) -> dict:
    """Model inputs for a batch of B conversations.

    conversations: one conversation (list of message dicts) or a list of B of them.
    images / videos: flat lists, one entry per image / video part in order of appearance over the
      batch, or None to take each item from its part: {"type": "image", "image" | "url" | "path" | "base64": ...},
      {"type": "video", "video" | "url" | "path" | "base64": ...}; paths, http(s)/file/data: URLs, bytes,
      PIL images, arrays, frame lists (spec/media.py says which key wins and what is refused).
    min_pixels / max_pixels: image budget passed to preprocess_image (None: its defaults).
    fps / nframes: video sampling for every video (transformers' apply_chat_template(fps=...)).
    video_options: other keyword arguments of preprocess_video (min_pixels, max_pixels, max_video_bytes, ...).
      A part's own options (qwen-vl-utils keys: min_pixels, max_pixels, resized_height, resized_width, and for
      videos fps, nframes, min_frames, max_frames, total_pixels, video_start, video_end) override the call's.
    max_decoded_pixels: decompression-bomb limit for decoded images and frames (None: opt in to large ones).
    fetch: spec.media.FetchLimits for http(s) URLs (timeout, max_bytes, max_redirects).
    media: the result of prepare_media for these conversations (then images, videos and the media options
      must not be given: the media were prepared already).
    Returns input_ids int64 [B, L], attention_mask int64 [B, L] (left padded with 151643),
      pixel_values float32 [P_img, 1176] | None, image_grid_thw int64 [n_img, 3] | None,
      pixel_values_videos float32 [P_vid, 1176] | None, video_grid_thw int64 [n_vid, 3] | None,
      second_per_grid_ts float64 [n_vid] | None.
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"tokenizer must be a tokenizers.Tokenizer (see load_tokenizer), got {type(tokenizer).__name__}"
        )
    for pad in (IMAGE_PAD, VIDEO_PAD):
        if tokenizer.token_to_id(pad) is None:
            raise ValueError(f"tokenizer has no {pad} token: it is not a Qwen2.5-VL tokenizer")
    batch = _batch_checked(conversations)
    if media is None:
        media = prepare_media(
            batch,
            images,
            videos,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            fps=fps,
            nframes=nframes,
            video_options=video_options,
            max_decoded_pixels=max_decoded_pixels,
            fetch=fetch,
        )
    elif images is not None or videos is not None:
        raise ValueError("give either media= (from prepare_media) or images / videos, not both")

    texts = [
        render_chat(conv, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id) for conv in batch
    ]
    texts = expand_vision_tokens(texts, media["image_grid_thw"], media["video_grid_thw"])
    rows = [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]

    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), PAD_TOKEN_ID, dtype=torch.int64)  # [B, L]
    attention_mask = torch.zeros((len(rows), L), dtype=torch.int64)  # [B, L]
    for b, r in enumerate(rows):
        if r:
            input_ids[b, L - len(r) :] = torch.tensor(r, dtype=torch.int64)
            attention_mask[b, L - len(r) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        **{k: media[k] for k in MEDIA_KEYS},
    }
