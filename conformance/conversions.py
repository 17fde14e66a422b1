"""From what a port naturally has to the harness's canonical layout (docs/exchange.md).

Small pure functions, shared by the file exchange (adapters/files.py) and by built-in targets that
drive a port in another layout (llama.cpp, mlx-vlm). Each takes `where`, the words naming the
value (file and key), and raises ConversionError (a ValueError) saying what was expected there.

Shape legend: B rows, L padded length, L_i row i's real tokens, C width, V vocab, P patches.
The canonical layout (docs/INTERFACES.md): text stages [B, L, ...] left padded (attention_mask 0
at padding), vision stages [P, C] in pixel_values row order, images of every row first, then
videos; positions [3, B, L]; rope_deltas [B, 1] against the padded length.
"""

from __future__ import annotations

import numbers

import torch

from ..spec.windows import window_partition, window_row_order

# accepted conventions, declared per key in OUT/port.json (docs/exchange.md)
CONVENTIONS = {
    "outputs": ("batch", "rows"),
    "logits": ("all", "last"),
    "vision_block_order": ("pixel_values", "window"),
    "positions": ("sections", "sections4", "tokens"),
    "rope_deltas": ("padded", "unpadded"),
}
PADDED_POSITION = 1  # what the reference puts at left padding (never judged: masked)
# a captured stage given at some positions only carries "<stage>@positions", bool [B, L]: the judge
# looks at those positions alone (case_runner), so zeros elsewhere never count
GIVEN = "@positions"


class ConversionError(ValueError):
    """A port's value that does not fit the convention it declared."""

    said_in_full = True  # its text names the file, the key and what is wrong: reported as it is


def check_convention(key: str, value, where: str) -> str:
    """`value` if it is an accepted convention for `key`, else ConversionError naming both."""
    if key not in CONVENTIONS:
        raise ConversionError(f"{where}: unknown key {key!r}; known: {sorted(CONVENTIONS)}")
    if value not in CONVENTIONS[key]:
        raise ConversionError(
            f"{where}: {key} = {value!r} is not a known convention; expected one of {CONVENTIONS[key]}"
        )
    return value


def to_float32(t: torch.Tensor, where: str) -> torch.Tensor:
    """Any floating tensor (bfloat16, float16, float32, float64) -> float32."""
    if not t.is_floating_point():
        raise ConversionError(f"{where}: expected a floating-point tensor, got {t.dtype}")
    return t.to(torch.float32)


def _expect_integers(t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConversionError(f"{where}: expected an integer tensor, got {t.dtype}")


def _expect_shape(t: torch.Tensor, shape: tuple, where: str, meaning: str) -> None:
    """shape: ints, or None for any size on that axis."""
    ok = t.dim() == len(shape) and all(s is None or int(n) == s for n, s in zip(t.shape, shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ConversionError(f"{where}: expected shape {want} ({meaning}), got {list(t.shape)}")


def row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """attention_mask int [B, L] -> L_i, the real tokens of each row."""
    return [int(n) for n in attention_mask.sum(-1)]


def place_rows(
    rows: list[torch.Tensor], attention_mask: torch.Tensor, where: list[str], *, width=None, meaning: str = ""
) -> torch.Tensor:
    """Per-row values [L_i, ...] over each row's real tokens -> [B, L, ...] at the mask's real positions
    (left padding: the last L_i slots of row i); padded slots are 0 (masked out when judged).
    width: the size(s) of the trailing axes when known (C, V), so a wrong one is named against them;
    None: the first row's trailing axes, and every row must have the same."""
    B, L = attention_mask.shape
    if len(rows) != B:
        raise ConversionError(f"{where[0] if where else 'rows'}: {len(rows)} rows given, the batch has {B}")
    tail = (width,) if isinstance(width, int) else tuple(width) if width is not None else None
    for i, (r, n) in enumerate(zip(rows, row_lengths(attention_mask))):
        want = (n, *(tail if tail is not None else (None,) * max(r.dim() - 1, 0)))
        _expect_shape(r, want, where[i], f"row {i}'s {n} real tokens, no padding{meaning}")
    tail = tail if tail is not None else tuple(rows[0].shape[1:])
    for i, r in enumerate(rows):
        _expect_shape(r, (r.shape[0], *tail), where[i], f"the trailing axes of row 0, {list(tail)}")
    out = rows[0].new_zeros((B, L, *tail))
    for i, r in enumerate(rows):
        out[i, attention_mask[i].bool()] = r
    return out


def _runs(ids: torch.Tensor, token: int) -> list[int]:
    """Lengths of the maximal runs of `token` in ids [L] (one run = one image or video)."""
    runs, n = [], 0
    for x in ids.tolist() + [None]:
        if x == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def vision_row_items(input_ids: torch.Tensor, grid_thw, token_id: int, merge_size: int) -> list[list[int]]:
    """Which items (indices into grid_thw, images or videos) each row holds: one per run of `token_id`
    in input_ids [B, L], taken in order, each run t*h*w/m² tokens long."""
    grid = [] if grid_thw is None else [tuple(int(v) for v in g) for g in grid_thw]
    out, k = [], 0
    for b in range(input_ids.shape[0]):
        mine = []
        for n in _runs(input_ids[b], token_id):
            if k >= len(grid) or grid[k][0] * grid[k][1] * grid[k][2] // merge_size**2 != n:
                raise ConversionError(f"row {b}: a run of {n} vision tokens (id {token_id}) matches no grid_thw {grid}")
            mine.append(k)
            k += 1
        out.append(mine)
    return out


def place_vision_rows(
    rows: list[torch.Tensor | None],
    image_items,
    video_items,
    image_grid,
    video_grid,
    where: list[str],
    *,
    per: int,
    width: int | None = None,
    meaning: str = "",
) -> torch.Tensor:
    """Per-row vision values (row i: its images' rows, then its videos', in pixel_values order) ->
    [P, ...] in the canonical order (the images of every row, then the videos). image_items /
    video_items: vision_row_items. `per`: grid cells per row of the value (1 for patch rows, m² for
    vision.merger's tokens). width: the row width when known (Cv, C), named in a wrong shape."""
    sizes = {
        kind: [g[0] * g[1] * g[2] // per for g in ([] if grid is None else grid.tolist())]
        for kind, grid in (("image", image_grid), ("video", video_grid))
    }
    images, videos = [], []
    for i, r in enumerate(rows):
        n_img = sum(sizes["image"][k] for k in image_items[i])
        n_vid = sum(sizes["video"][k] for k in video_items[i])
        if r is None:
            if n_img + n_vid:
                raise ConversionError(f"{where[i]}: absent, but row {i} has {n_img + n_vid} vision rows")
            continue
        want = (n_img + n_vid, width)
        _expect_shape(r, want, where[i], f"row {i}'s {n_img} image + {n_vid} video rows{meaning}")
        images.append(r[:n_img])
        videos.append(r[n_img:])
    if not images:
        raise ConversionError(f"{where[0]}: no row gives a value")
    return torch.cat(images + videos)


def unpermute_windows(
    x: torch.Tensor, grid_thw, *, window_size: int, patch_size: int, merge_size: int, where: str, width=None
):
    """Vision rows [P, C] in window order (the order the encoder runs its blocks in: spec
    window_partition's window_index, in units of m² patch rows) -> pixel_values row order."""
    index, _, _ = window_partition(grid_thw, window_size=window_size, patch_size=patch_size, merge_size=merge_size)
    order = window_row_order(index, merge_size)  # [P]: place i holds pixel row order[i]
    _expect_shape(x, (len(order), width), where, "patch rows of grid_thw in window order")
    return x[torch.argsort(order)]


def positions_row(t: torch.Tensor, layout: str, n: int, where: str) -> torch.Tensor:
    """One row's positions in a declared layout -> [3, L_i] (t, h, w).
    sections: [3, L_i]; sections4: llama.cpp's [4, L_i] or flat [4*L_i] (t, y, x, 0 sections); tokens: [L_i, 3]."""
    _expect_integers(t, where)
    if layout == "sections":
        _expect_shape(t, (3, n), where, "3 sections (t, h, w) x the row's tokens")
        return t
    if layout == "sections4":
        if t.dim() == 1:
            _expect_shape(t, (4 * n,), where, "llama.cpp's flat t, y, x, 0 sections of the row's tokens")
            t = t.reshape(4, n)
        _expect_shape(t, (4, n), where, "4 sections (t, y, x, 0) x the row's tokens")
        if (t[3] != 0).any():
            raise ConversionError(f"{where}: the fourth section (llama.cpp's unused one) must be 0")
        return t[:3]
    if layout == "tokens":
        _expect_shape(t, (n, 3), where, "the row's tokens x (t, h, w)")
        return t.T
    raise ConversionError(f"{where}: unknown positions layout {layout!r}; expected one of {CONVENTIONS['positions']}")


def place_positions(rows: list[torch.Tensor], layout: str, attention_mask: torch.Tensor, where: list[str]):
    """Per-row positions in `layout` -> int64 [3, B, L], PADDED_POSITION at padding."""
    n = row_lengths(attention_mask)
    rows = [positions_row(r, layout, n[i], where[i]).T for i, r in enumerate(rows)]  # [L_i, 3] each
    out = place_rows(rows, attention_mask, where).permute(2, 0, 1).to(torch.int64)  # [3, B, L]
    return torch.where(attention_mask.bool()[None], out, PADDED_POSITION)


def rope_deltas_padded(deltas: torch.Tensor, convention: str, attention_mask: torch.Tensor, where: str):
    """rope_deltas [B] or [B, 1] -> [B, 1] against the padded length L (the reference's convention:
    max position + 1 - L). 'unpadded' (max + 1 - L_i, a row run alone) moves by L_i - L."""
    B, L = attention_mask.shape
    _expect_integers(deltas, where)
    if deltas.numel() != B:
        raise ConversionError(f"{where}: expected {B} rope_deltas (one per row), got shape {list(deltas.shape)}")
    d = deltas.reshape(B, 1).to(torch.int64)
    if convention == "padded":
        return d
    if convention == "unpadded":
        return d + (attention_mask.sum(-1, keepdim=True).to(torch.int64) - L)
    raise ConversionError(
        f"{where}: unknown rope_deltas convention {convention!r}; expected {CONVENTIONS['rope_deltas']}"
    )


def place_last_logits(last: torch.Tensor, attention_mask: torch.Tensor, where: str):
    """Logits at each row's last prompt token, [B, V] -> ([B, L, V] with 0 elsewhere, bool [B, L]
    marking the positions given): the logits rule judges those positions only."""
    B, L = attention_mask.shape
    _expect_shape(last, (B, None), where, "one vocabulary row per batch row, at its last prompt token")
    if not bool(attention_mask[:, -1].all()):
        raise ConversionError(f"{where}: the batch is not left padded; the last prompt token is not at the end")
    full = last.new_zeros(B, L, last.shape[-1])
    full[:, -1] = last
    given = torch.zeros(B, L, dtype=torch.bool)
    given[:, -1] = True
    return full, given


def _token_id(x, where: str, at: str, vocab_size: int | None) -> int:
    """A JSON integer that is a token id (0 <= id < vocab_size), else ConversionError saying which."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ConversionError(f"{where}: {at}: {_short(x)} is not an integer token id (a JSON integer, no fraction)")
    x = int(x)
    if x < 0 or (vocab_size is not None and x >= vocab_size):
        limit = f"0 <= id < vocab_size {vocab_size}" if vocab_size is not None else "ids are >= 0"
        raise ConversionError(f"{where}: {at}: id {x} is not a token id ({limit})")
    return x


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _step_table(r, where: str, at: str, k: int | None, check) -> list:
    """One row of a per-step table ([n_i, k]): each step a list of k values, each checked."""
    if not isinstance(r, list):
        raise ConversionError(f"{where}: {at} is {type(r).__name__}, expected a list of steps")
    out = []
    for t, step in enumerate(r):
        if not isinstance(step, list) or (k is not None and len(step) != k):
            want = f"a list of {k} values" if k is not None else "a list"
            raise ConversionError(f"{where}: {at} step {t}: expected {want}, got {_short(step)}")
        out.append([check(x, f"{at} step {t}") for x in step])
    return out


def _log_prob(x, where: str, at: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ConversionError(f"{where}: {at}: {_short(x)} is not a number")
    return float(x)


def pad_generated(rows: list, eos_ids, pad_id: int, where: str, *, fill=None, vocab_size: int | None = None):
    """Generated rows of different lengths -> [B, n], n the longest row: the reference's own layout
    (spec generate_greedy stops when every row has stopped or after max_new_tokens, and fills a row
    with pad_id after its eos). A row shorter than the longest must end in one of eos_ids (it stopped).
    Token ids must be JSON integers in 0 <= id < vocab_size (when given); a float, even 39784.0, is
    refused, naming the row and step. `fill` given: rows are per-step tables (top-k ids or log-probs,
    [n_i, k]), extended with steps of k x `fill`; ids are checked as tokens, log-probs as numbers."""
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ConversionError(f"{where}: expected a list of rows, each a list")
    n = max((len(r) for r in rows), default=0)
    if fill is not None:
        k = next((len(r[0]) for r in rows if r and isinstance(r[0], list)), 0)
        if isinstance(fill, numbers.Integral) and not isinstance(fill, bool):

            def check(x, at):
                return _token_id(x, where, at, vocab_size)

        else:

            def check(x, at):
                return _log_prob(x, where, at)

        tables = [_step_table(r, where, f"row {i}", k, check) for i, r in enumerate(rows)]
        return torch.tensor([r + [[fill] * k] * (n - len(r)) for r in tables]).reshape(len(rows), n, k)
    out = []
    for i, r in enumerate(rows):
        ids = [_token_id(x, where, f"row {i} step {t}", vocab_size) for t, x in enumerate(r)]
        if len(ids) < n and (not ids or ids[-1] not in set(eos_ids)):
            raise ConversionError(
                f"{where}: row {i} has {len(ids)} tokens and does not end in an eos id {list(eos_ids)}; "
                f"the longest row has {n} (only a row that stopped may be shorter)"
            )
        out.append(ids + [pad_id] * (n - len(ids)))
    return torch.tensor(out, dtype=torch.int64).reshape(len(rows), n)
