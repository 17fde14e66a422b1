"""Say what the worst coordinate of a failing stage is, and which rows hold its error, in the model's own terms."""

from __future__ import annotations

from collections import Counter

import torch

from ..spec.config import Qwen25VLConfig
from ..spec.windows import vision_rotary_positions
from .compare import QUIET, row_errors


def locate(stage: str, values: dict, inputs: dict, config: Qwen25VLConfig) -> str:
    """The worst coordinate (locate_worst), then where the error sits (locate_rows), for a failing stage's
    verdict values (compare.floats: "worst", and "rows" for a failing hidden state)."""
    return locate_worst(stage, values["worst"], inputs, config) + locate_rows(stage, values.get("rows"), inputs, config)


def locate_worst(stage: str, worst: list[int], inputs: dict, config: Qwen25VLConfig) -> str:
    """Say what the worst coordinate is: for a vision stage the item, frame, patch (row, col) and
    whether it sits on a window edge; for a text stage the token and whether it is a vision pad.
    config: the checkpoint's (window size in patches, the pad token ids)."""
    try:
        if stage in _PIXEL_GRIDS:
            return _pixel(worst, inputs, config, _PIXEL_GRIDS[stage])
        if stage.startswith("vision.") and stage != "vision.merger":
            item, frame, row, col, h, w, edge = _patch(worst[0], inputs, config)
            said = f" = item {item} frame {frame} patch (row {row}, col {col}) of a {h}x{w} grid"
            if stage == "vision.patch_embed":  # before any attention: windows mean nothing yet
                return said
            return said + (", on a window edge" if edge else ", inside a window")
        if stage == "vision.merger":
            item, frame, row, col, h, w = _merged(worst[0], inputs, config)
            return f" = item {item} frame {frame} merged token (row {row}, col {col}) of a {h}x{w} merged grid"
        if _by_token(stage):
            return " = " + _token(worst[0], worst[1], inputs, config, batch_named=True)
    except (IndexError, KeyError, ValueError, RuntimeError):
        pass
    return ""


# the preprocessed pixels: their rows are one kind's patches, in the vision stages' order
_PIXEL_GRIDS = {"preprocess.pixel_values": ("image_grid_thw",), "preprocess.pixel_values_videos": ("video_grid_thw",)}


def _pixel(worst: list[int], inputs: dict, config: Qwen25VLConfig, grids: tuple[str, ...]) -> str:
    """' = item 0 frame 1 patch (row 4, col 3) of a 8x10 grid: channel 2 (blue) of its frame 1, pixel (5, 9)':
    a pixel_values row is one patch, its columns [channel, temporal frame, y, x] (spec/image.py patchify)."""
    v = config.vision
    item, frame, row, col, h, w, _ = _patch(worst[0], inputs, config, grids)
    ch, rest = divmod(worst[1], v.temporal_patch_size * v.patch_size**2)
    t, rest = divmod(rest, v.patch_size**2)
    colour = f" ({('red', 'green', 'blue')[ch]})" if v.in_chans == 3 else ""
    return (
        f" = item {item} frame {frame} patch (row {row}, col {col}) of a {h}x{w} grid: channel {ch}{colour} of its "
        f"frame {t}, pixel {divmod(rest, v.patch_size)}"
    )


def _item_of(
    r: int, inputs: dict, merge: int, grids: tuple[str, ...] = ("image_grid_thw", "video_grid_thw")
) -> tuple[int, int, torch.Tensor]:
    """Row r of a vision stage whose rows are the items' patches (merge 1) or merged tokens (merge 2), the
    images first: (item, r's index inside it, the grid of every item [k, 3]). grids: the kinds the rows hold."""
    grid = torch.cat([inputs[k] for k in grids if inputs.get(k) is not None])
    sizes = (grid.prod(-1) // merge**2).tolist()
    item, start = 0, 0
    while r >= start + sizes[item]:
        start += sizes[item]
        item += 1
    return item, r - start, grid


def _patch(
    p: int, inputs: dict, config: Qwen25VLConfig, grids: tuple[str, ...] = ("image_grid_thw", "video_grid_thw")
) -> tuple[int, int, int, int, int, int, bool]:
    """Patch p of a vision stage's rows: (item, frame, row, col, grid h, grid w, on a window edge)."""
    window = config.vision.window_size // config.vision.patch_size  # patches per window side
    item, at, grid = _item_of(p, inputs, 1, grids)
    t, h, w = grid[item].tolist()
    frame = at // (h * w)
    row, col = vision_rotary_positions(grid[item : item + 1])[at].tolist()
    edge = row % window in (0, window - 1) or col % window in (0, window - 1) or row == h - 1 or col == w - 1
    return item, frame, row, col, h, w, edge


def _merged(m: int, inputs: dict, config: Qwen25VLConfig) -> tuple[int, int, int, int, int, int]:
    """Merged token m of vision.merger's rows (item order, each item frame by frame, row-major): (item,
    frame, row, col, merged grid h, merged grid w)."""
    merge = config.vision.spatial_merge_size
    item, at, grid = _item_of(m, inputs, merge)
    _, h, w = grid[item].tolist()
    h, w = h // merge, w // merge
    frame, at = divmod(at, h * w)
    return item, frame, at // w, at % w, h, w


def _by_token(stage: str) -> bool:
    """Whether a row of `stage` is a token of the prompt (else a patch or a merged token)."""
    return stage.startswith("text.") or stage == "logits"


def _token(b: int, tok: int, inputs: dict, config: Qwen25VLConfig, *, batch_named: bool) -> str:
    """'row 0 token 15 (id 151655, an image pad)', without 'row 0 ' unless batch_named."""
    return ("" if not batch_named else f"row {b} ") + f"token {_token_at(b, tok, inputs, config)}"


def _token_at(b: int, tok: int, inputs: dict, config: Qwen25VLConfig) -> str:
    """'15 (id 151655, an image pad)': token tok of batch row b."""
    tid = int(inputs["input_ids"][b, tok])
    return f"{tok} (id {tid}, {_token_kind(tid, config)})"


# a token's kind: (one, several)
_KINDS = {
    "image": ("image pad", "image pads"),
    "video": ("video pad", "video pads"),
    "text": ("text token", "text tokens"),
}


def _kind(tid: int, config: Qwen25VLConfig) -> str:
    return {config.image_token_id: "image", config.video_token_id: "video"}.get(tid, "text")


def _token_kind(tid: int, config: Qwen25VLConfig) -> str:
    """'an image pad', 'a video pad' or 'a text token'."""
    one = _KINDS[_kind(tid, config)][0]
    return ("an " if one[0] in "aeiou" else "a ") + one


def _row_unit(stage: str) -> tuple[str, str]:
    """What a row of `stage` is: (one, several)."""
    if _by_token(stage):
        return "token", "tokens"
    return ("merged token", "merged tokens") if stage == "vision.merger" else ("patch", "patches")


def _name_rows(stage: str, rows: list[list[int]], inputs: dict, config: Qwen25VLConfig, *, of: int) -> str:
    """The listed rows of `of`: 'tokens 0, 16, 94 (all id 151644, a text token)' for a text stage, 'patches 3
    (row 0, col 3), 17 (row 2, col 1) (1 of 2 on a window edge)' for a vision one, then ' and N more'."""
    unit = _row_unit(stage)[len(rows) > 1]
    if _by_token(stage) and inputs["input_ids"].shape[0] == 1:
        names = f"{unit} " + ", ".join(str(r[1]) for r in rows)
    elif _by_token(stage):
        names = ", ".join(f"row {r[0]} token {r[1]}" for r in rows)
    elif stage == "vision.merger":
        places = [_merged(r[0], inputs, config) for r in rows]
        names = f"{unit} " + ", ".join(f"{r[0]} (row {p[2]}, col {p[3]})" for r, p in zip(rows, places))
    else:
        places = [_patch(r[0], inputs, config) for r in rows]
        names = f"{unit} " + ", ".join(f"{r[0]} (row {p[2]}, col {p[3]})" for r, p in zip(rows, places))
        if stage != "vision.patch_embed":
            names += f" ({sum(p[6] for p in places)} of {len(rows)} on a window edge)"
    if _by_token(stage):
        tids = [int(inputs["input_ids"][r[0], r[1]]) for r in rows]
        if len(set(tids)) == 1:
            names += f" (all id {tids[0]}, {_token_kind(tids[0], config)})" if len(tids) > 1 else f" (id {tids[0]})"
        else:
            counts = Counter(_kind(t, config) for t in tids)
            names += " (" + ", ".join(f"{n} {_KINDS[k][n > 1]}" for k, n in counts.items()) + ")"
    return names + (f" and {of - len(rows)} more" if of > len(rows) else "")


def _quiet_run(n: int, where: str) -> str:
    """'the token before it is' for 1, 'the 15 tokens before it are' for 15."""
    return f"the token {where} is" if n == 1 else f"the {n} tokens {where} are"


def _spans(stage: str, spans: list[list[int]], inputs: dict, config: Qwen25VLConfig) -> str:
    """Where a sequence's error starts and ends, when the tokens outside are quiet (compare.loud_spans):
    '; the error starts at token 15 (id 151655, an image pad): the 15 tokens before it are quiet (...)'."""
    quiet = f"quiet (mean {'KL' if stage == 'logits' else 'squared error'} <= {1 / QUIET:.0%} of the rest's)"
    batch_named = inputs["input_ids"].shape[0] > 1
    out = ""
    for b, first, last, before, after in spans:
        at = f" in row {b}" if batch_named else ""
        first_tok, last_tok = (_token_at(b, t, inputs, config) for t in (first, last))
        if before and after:
            out += f"; the error{at} sits in token {first_tok} to {last_tok}: the "
            out += f"{'token' if before == 1 else f'{before} tokens'} before and the {after} after are {quiet}"
        elif before:
            out += f"; the error{at} starts at token {first_tok}: {_quiet_run(before, 'before it')} {quiet}"
        else:
            out += f"; the error{at} ends at token {last_tok}: {_quiet_run(after, 'after it')} {quiet}"
    return out


def locate_rows(stage: str, rows: dict | None, inputs: dict, config: Qwen25VLConfig) -> str:
    """Say where the error of a failing stage sits (compare.error_rows, compare.logit_stats): where in the
    sequence it starts and ends, rows the port erased (all zero where the golden's are not), and the few rows
    that hold most of the error, when they do."""
    if not rows:
        return ""
    out = ""
    try:
        unit = _row_unit(stage)[1]
        if rows.get("spans") and _by_token(stage):
            out += _spans(stage, rows["spans"], inputs, config)
        if rows.get("sees_ahead") and stage.startswith("text.layer."):
            out += (
                "; the last token of each row is quiet and the error falls along the sequence toward it: the last "
                "token sees every token either way, so the others see tokens after them (a causal mask missing)"
            )
        if rows.get("zero_count"):
            listed = _name_rows(stage, rows["zero_rows"], inputs, config, of=rows["zero_count"])
            out += f"; {rows['zero_count']} of {rows['total']} {unit} come out all zero where the golden's are not: {listed}"
        if rows.get("batch"):
            b, share = rows["batch"]
            out += f"; {share:.0%} of the error is in batch row {b}"
        if rows.get("rows"):
            listed = _name_rows(stage, rows["rows"], inputs, config, of=rows["of"])
            out += f"; {rows['share']:.0%} of the error is in {rows['of']} of {rows['total']} {unit}: {listed}"
    except (IndexError, KeyError, ValueError, RuntimeError):
        return out
    return out


def locate_kinds(stage: str, golden, got, mask, inputs: dict, config: Qwen25VLConfig) -> str:
    """Which kinds of token (image pads, video pads, text) a failing text hidden state [B, L, C] has its error
    on, when the other kinds are quiet: '; the error is on the video pads (40 of 89 tokens): the 15 image pads
    and 34 text tokens are quiet (...)'. Vision features written to the wrong pads, or one kind never encoded,
    shows so at text.inputs_embeds, however the pads lie in the prompt. '' when no kind is quiet, when the
    prompt has one kind, or when the shapes are not the golden prompt's."""
    try:
        ids = inputs["input_ids"]
        if not _by_token(stage) or stage == "logits" or got.shape != golden.shape or golden.shape[:2] != ids.shape:
            return ""
        per_row = row_errors(golden, torch.as_tensor(got), mask)  # a port may hand back a numpy array
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().reshape(ids.shape)
        kinds = [_kind(t, config) for t in ids[valid].tolist()]
        errors = per_row[valid].tolist()
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError):
        return ""
    by_kind: dict[str, list[float]] = {}
    for k, e in zip(kinds, errors):
        by_kind.setdefault(k, []).append(e)
    mean = sorted(((sum(v) / len(v), k) for k, v in by_kind.items()), reverse=True)
    # the loud kinds: the first QUIET-fold step down in the kinds' mean errors
    split = next((j for j in range(1, len(mean)) if mean[j][0] * QUIET <= mean[j - 1][0]), None)
    if split is None or mean[0][0] == 0:
        return ""
    order = list(_KINDS)  # said in one order: image, video, text
    loud, quiet = (sorted((k for _, k in part), key=order.index) for part in (mean[:split], mean[split:]))

    def named(k: str) -> str:
        n = len(by_kind[k])
        return f"{n} {_KINDS[k][n > 1]}"

    n_loud = sum(len(by_kind[k]) for k in loud)
    said = " and ".join(f"the {_KINDS[k][1]}" for k in loud)
    return (
        f"; the error is on {said} ({n_loud} of {len(kinds)} tokens): the {' and '.join(named(k) for k in quiet)} "
        f"{'is' if len(quiet) == 1 and len(by_kind[quiet[0]]) == 1 else 'are'} quiet (mean squared error <= "
        f"{1 / QUIET:.0%} of the loud ones')"
    )


def _video_frames(stage: str, ids: torch.Tensor, valid: torch.Tensor, inputs: dict, config: Qwen25VLConfig) -> list:
    """Which video frame each row of `stage` belongs to: a list of (video, frame) or None, one per row the
    stage's error rows are listed in (patches or merged tokens for vision stages, the valid tokens of the
    prompt, row-major, for text ones). A frame is one temporal patch (temporal_patch_size frames)."""
    merge = config.vision.spatial_merge_size
    videos = inputs["video_grid_thw"].tolist()
    if _by_token(stage):
        per_token = [None] * int(valid.sum())
        pads = [k for k, t in enumerate(ids[valid].tolist()) if t == config.video_token_id]
        frames = [(v, f) for v, (t, h, w) in enumerate(videos) for f in range(t) for _ in range(h * w // merge**2)]
        for k, vf in zip(pads, frames):
            per_token[k] = vf
        return per_token
    unit = merge**2 if stage == "vision.merger" else 1
    images = inputs.get("image_grid_thw")
    before = 0 if images is None else int(images.prod(-1).sum()) // unit
    return [None] * before + [
        (v, f) for v, (t, h, w) in enumerate(videos) for f in range(t) for _ in range(h * w // unit)
    ]


def locate_frames(stage: str, golden, got, mask, inputs: dict, config: Qwen25VLConfig) -> str:
    """Which frames of a video a failing stage [.., C] has its error in, when its other frames are quiet:
    '; in video 0 (3 frames) the error is in frames 1, 2: frame 0 is quiet (...)'. A bug of the time axis
    (time positions, the pairing of frames into temporal patches) leaves some frames alone, where a bug of
    space is in every frame. '' when every frame is loud, for images, and when the shapes are not the
    golden's."""
    try:
        if inputs.get("video_grid_thw") is None or stage == "logits" or got.shape != golden.shape:
            return ""
        ids = inputs["input_ids"]
        per_row = row_errors(golden, torch.as_tensor(got), mask if _by_token(stage) else None)
        if _by_token(stage):
            if golden.shape[:2] != ids.shape:
                return ""
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().reshape(ids.shape)
            errors = per_row[valid].tolist()
        else:
            valid, errors = None, per_row.reshape(-1).tolist()
        frames = _video_frames(stage, ids, valid, inputs, config)
        if len(frames) != len(errors):
            return ""
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError):
        return ""
    by_frame: dict[tuple[int, int], list[float]] = {}
    for vf, e in zip(frames, errors):
        if vf is not None:
            by_frame.setdefault(vf, []).append(e)
    out = ""
    for v in sorted({vf[0] for vf in by_frame}):
        means = {f: sum(e) / len(e) for (w, f), e in sorted(by_frame.items()) if w == v}
        loudest = max(means.values())
        quiet = [f for f, m in means.items() if m * QUIET <= loudest]
        if len(means) < 2 or not quiet or loudest == 0:
            continue
        loud = [f for f in means if f not in quiet]
        out += (
            f"; in video {v} ({len(means)} frames) the error is in frame{'s' * (len(loud) > 1)} "
            f"{', '.join(map(str, loud))}: frame{'s' * (len(quiet) > 1)} {', '.join(map(str, quiet))} "
            f"{'are' if len(quiet) > 1 else 'is'} quiet (mean squared error <= {1 / QUIET:.0%} of the loudest frame's)"
        )
        if _by_token(stage) and quiet == [0]:
            out += ", so what differs is nothing at time 0 and something after it, as a time position is"
    return out


def locate_channels(stage: str, golden, got, config: Qwen25VLConfig) -> str:
    """For failing pixels [P, C*T*p*p]: the colour channels that hold the error when the others are quiet,
    '; the error is in channels 0 (red), 2 (blue): channel 1 (green) is quiet (...)', the mark of swapped
    channels (BGR) or one channel's mean and std. '' when every channel is loud or the shapes differ."""
    try:
        c = config.vision.in_chans
        if stage not in _PIXEL_GRIDS or tuple(got.shape) != tuple(golden.shape) or golden.shape[-1] % c:
            return ""
        diff = (torch.as_tensor(got).double() - golden.double()).reshape(golden.shape[0], c, -1)
    except (AttributeError, RuntimeError, TypeError):
        return ""
    per = diff.pow(2).mean((0, 2)).tolist()
    loud = max(per)
    quiet = [k for k, e in enumerate(per) if e * QUIET <= loud]
    if not quiet or loud == 0:
        return ""
    names = ("red", "green", "blue") if c == 3 else tuple(str(k) for k in range(c))

    def said(ks):
        return ", ".join(f"{k} ({names[k]})" for k in ks)

    loud_ks = [k for k in range(c) if k not in quiet]
    return (
        f"; the error is in channel{'s' * (len(loud_ks) > 1)} {said(loud_ks)}: channel{'s' * (len(quiet) > 1)} "
        f"{said(quiet)} {'are' if len(quiet) > 1 else 'is'} quiet (mean squared error <= {1 / QUIET:.0%} of the loudest's)"
    )
