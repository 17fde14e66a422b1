"""Metrics and verdicts: how a port's value is judged against the golden value of a stage.

Every comparison checks, in this order: kind (tensor or not), shape, dtype class (integer vs
floating), NaN/Inf, then values (onnx's assert_similar_outputs order), and says where the worst
difference sits. Float stages use the error-ratio rule

    rel_err(port, golden) <= ALPHA * rel_err(spec control in the port's dtype, golden) + FLOOR[dtype]

with rel_err the relative Frobenius norm ||x - g|| / ||g||. The control is the spec itself run in
that dtype, measured when the fixture was made, so error accumulated over depth is budgeted stage
by stage; FLOOR is the output-rounding noise of the dtype (u / sqrt(3), u = unit roundoff).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .precision import compute_dtype

ALPHA = 2.0
FLOOR = {"float64": 1e-6, "float32": 1e-6, "float16": 2.8e-4, "bfloat16": 2.3e-3}
KL_FLOOR = {"float64": 1e-9, "float32": 1e-9, "float16": 1e-5, "bfloat16": 1e-4}
TOP1_SLACK = 0.02  # a port may lose this much top-1 agreement beyond the control's (near-ties)
PIXELS_MAX_ABS = 1e-5
COS_SIN_MAX_ABS = 5e-3
TOPK = 5
# The tokens rule's logit noise is measured on the fixture machine (the spec's own decode logits at each
# precision); another CPU's reductions move a float32 log-prob further (3.2e-6 against a measured 2.9e-6 on
# a Xeon's AVX-512 path at one thread). So no precision is allowed less than its floor, like FLOOR for the
# hidden states; float64 measures no noise of its own, and two float64 ports differ in the last bits.
LOGIT_NOISE_FLOOR = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


@dataclass
class Verdict:
    status: str  # "pass" | "fail" | "error"
    metric: str = ""
    tolerance: str = ""
    where: str = ""  # worst coordinates, or the first differing item
    values: dict = field(default_factory=dict)


def _error(msg: str, tolerance: str = "") -> Verdict:
    return Verdict("error", msg, tolerance)


# ---------------------------------------------------------------- exact


def to_plain(x):
    """Tensors, arrays and tuples -> nested lists of Python ints/floats/strs (what JSON holds)."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    return x


def first_difference(expected, got, path: str = "") -> str | None:
    """Where two plain values first differ ('[2][0]: expected 3, got 4'), or None when equal.
    Integers compare by value and type class: 3 and 3.0 differ, since a float index is a bug."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{path or 'value'}: expected a dict, got {type(got).__name__}"
        for k in expected:
            if k not in got:
                return f"{path}.{k}: missing"
            d = first_difference(expected[k], got[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(expected, list):
        if not isinstance(got, list):
            return f"{path or 'value'}: expected a list of {len(expected)}, got {_short(got)}"
        if len(expected) != len(got):
            return f"{path or 'value'}: expected length {len(expected)}, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            d = first_difference(e, g, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(expected, int) and not isinstance(expected, bool):
        same = isinstance(got, int) and not isinstance(got, bool) and got == expected
    elif isinstance(expected, float):
        same = isinstance(got, (int, float)) and not isinstance(got, bool) and got == expected
    else:  # str, bool, None
        same = type(got) is type(expected) and got == expected
        if not same and isinstance(expected, str) and isinstance(got, str):
            return f"{path or 'value'}: {string_difference(expected, got)}"
    if not same:
        return f"{path or 'value'}: expected {_short(expected)}, got {_short(got)}"
    return None


def string_difference(expected: str, got: str, context: int = 30) -> str:
    """Where two strings first differ, with context on both sides (two long prompts that share an
    80-character prefix would otherwise look the same)."""
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    lo = max(0, i - context)

    def window(s: str) -> str:
        return ("…" if lo else "") + repr(s[lo : i + context]) + ("…" if i + context < len(s) else "")

    return (
        f"first difference at character {i} (lengths {len(expected)} and {len(got)}; "
        f"{i - lo} shared characters shown before it): expected {window(expected)}, got {window(got)}"
    )


def _short(x, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def exact(expected, got) -> Verdict:
    """One exact value (int, str, nested lists, int tensor)."""
    if isinstance(got, torch.Tensor) and got.is_floating_point():
        return _error(f"wrong dtype: {got.dtype}, an integer stage", "equal")
    d = first_difference(to_plain(expected), to_plain(got))
    if d is None:
        return Verdict("pass", "equal", "equal")
    return Verdict("fail", "differs", "equal", where=d)


def item_difference(expected, got, tol: float = 0.0, path: str = "") -> str | None:
    """first_difference for values that hold tensors: an integer tensor must be equal (and integer),
    a float tensor within max |diff| <= tol (tol 0: equal)."""
    where = path or "value"
    if isinstance(expected, torch.Tensor):
        try:
            g = got if isinstance(got, torch.Tensor) else torch.as_tensor(np.asarray(got))
        except (TypeError, ValueError, RuntimeError):
            return f"{where}: expected a tensor {list(expected.shape)}, got {_short(got)}"
        if tuple(g.shape) != tuple(expected.shape):
            return f"{where}: expected shape {list(expected.shape)}, got {list(g.shape)}"
        if expected.is_floating_point():
            d = (g.double() - expected.double()).abs()
            d = torch.where(torch.isnan(d), torch.inf, d)
            if d.numel() and d.max().item() > tol:
                idx = [int(i) for i in (d == d.max()).nonzero()[0]]
                return (
                    f"{where}: max |diff| {d.max().item():.3g} > {tol:g} at {idx} "
                    f"(expected {expected[tuple(idx)].item():.6g}, got {g[tuple(idx)].item():.6g})"
                )
            return None
        if g.is_floating_point() or g.dtype == torch.bool:
            return f"{where}: wrong dtype {g.dtype}, expected integers"
        ne = g.long() != expected.long()
        if ne.any():
            idx = [int(i) for i in ne.nonzero()[0]]
            return (
                f"{where}{idx}: expected {int(expected[tuple(idx)])}, got {int(g[tuple(idx)])} ({int(ne.sum())} differ)"
            )
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{where}: expected a dict, got {_short(got)}"
        for k in expected:
            if k not in got:
                return f"{path}.{k}: missing"
            d = item_difference(expected[k], got[k], tol, f"{path}.{k}")
            if d:
                return d
        return None
    if (
        isinstance(expected, list)
        and isinstance(got, (list, tuple))
        and any(isinstance(v, (torch.Tensor, dict, list)) for v in expected)
    ):
        if len(expected) != len(got):
            return f"{where}: expected length {len(expected)}, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            d = item_difference(e, g, tol, f"{path}[{i}]")
            if d:
                return d
        return None
    return first_difference(to_plain(expected), to_plain(got), path)


def exact_items(expected: list, got: list, inputs: list | None = None, tol: float = 0.0) -> Verdict:
    """A table of items (one function call each): all must be equal. `where` names the first bad item
    and its inputs, so the report shows the call that went wrong."""
    if not isinstance(got, list) or len(got) != len(expected):
        return _error(f"expected {len(expected)} item results, got {_short(got)}", "equal")
    bad, crashes, malformed = [], 0, 0
    skipped = sum(isinstance(g, dict) and "not_covered" in g for g in got)
    for k, (e, g) in enumerate(zip(expected, got)):
        if isinstance(g, dict) and "not_covered" in g:
            continue
        if isinstance(g, dict) and "malformed" in g:  # an answer in the wrong layout: an error, never credited
            bad.append((k, f"malformed result: {g['malformed']}"))
            malformed += 1
            continue
        if isinstance(g, dict) and "crash" in g and not (isinstance(e, dict) and e.get("error") == g.get("error")):
            bad.append((k, f"port raised {g['error']}: {g['crash']}"))
            crashes += 1
            continue
        d = item_difference(e, g, tol)
        if d:
            bad.append((k, d))
    n = len(expected) - skipped
    tol_text = "equal" if tol == 0 else f"ints equal, floats max_abs <= {tol:g}"
    more = f" ({skipped} not covered)" if skipped else ""
    if not bad:
        return Verdict(
            "pass", f"{n}/{n} items equal{more}", tol_text, values={"items": n, "bad": 0, "not_covered": skipped}
        )
    k, d = bad[0]
    where = f"item {k}" + (f" {_short(inputs[k], 160)}" if inputs else "") + f": {d}"
    if len(bad) > 1:
        where += f" (and {len(bad) - 1} more: items {[j for j, _ in bad[1:21]]})"
    # only crashes, or any malformed answer: the port broke, it did not disagree
    status = "error" if crashes == len(bad) or malformed else "fail"
    return Verdict(
        status,
        f"{n - len(bad)}/{n} items equal"
        + (f", {crashes} raised" if crashes else "")
        + (f", {malformed} malformed" if malformed else "")
        + more,
        tol_text,
        where=where,
        values={
            "items": n,
            "bad": len(bad),
            "first_bad": k,
            "bad_items": [j for j, _ in bad],
            "bad_labels": [inputs[j] for j, _ in bad] if inputs else [],
        },
    )


# ---------------------------------------------------------------- floats


def check_tensor(golden: torch.Tensor, got, *, floating: bool) -> tuple[torch.Tensor | None, str | None]:
    """Kind, shape, dtype class, NaN/Inf. Returns (got as a tensor, None) or (None, why it is bad)."""
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if isinstance(got, Exception):  # the file exchange's reader put why it could not read this stage in its place
        return None, str(got)
    if not isinstance(got, torch.Tensor):
        return None, f"expected a tensor, got {type(got).__name__}"
    kind = not_dense(got)
    if kind:
        return None, f"expected a dense tensor with values, got {kind}"
    if tuple(got.shape) != tuple(golden.shape):
        return None, f"wrong shape: expected {list(golden.shape)}, got {list(got.shape)}"
    if floating and not got.is_floating_point():
        return None, f"wrong dtype: expected a floating dtype, got {got.dtype}"
    if not floating and (got.is_floating_point() or got.is_complex() or got.dtype == torch.bool):
        return None, f"wrong dtype: expected an integer dtype, got {got.dtype}"
    if floating:
        bad = ~torch.isfinite(got)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return None, f"{int(bad.sum())} non-finite values (NaN/Inf), first at {list(idx)}"
    return got, None


def not_dense(t: torch.Tensor) -> str:
    """'' for a strided tensor whose values can be read, else what it is: a nested, sparse or meta tensor has
    no shape or no values to compare (their .shape or .item() raise deep inside torch)."""
    if t.is_nested:
        return "a nested tensor"
    if t.layout != torch.strided:
        return f"a tensor of layout {t.layout}"
    if t.device.type == "meta":
        return "a tensor on the meta device (a shape without values)"
    return ""


def _masked(golden: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None):
    g, x = golden.double(), got.double()
    if mask is not None:  # [B, L] applies to the leading dims of a text stage
        m = mask.bool()
        while m.dim() < g.dim():
            m = m.unsqueeze(-1)
        m = m.expand_as(g)
        g, x = torch.where(m, g, 0.0), torch.where(m, x, 0.0)
    return g, x


# A real checkpoint's residual stream carries a few channels far above the rest (the 3B's vision tower: one
# at 2.3e4 by block 31, lablup/mlxcel#1601), and its later norms' weights undo them. Measured whole, such a
# channel's error hides every other channel's: a wrong attention passes every vision block at bfloat16 and
# shows first at the merger. So in a hidden-state comparison no channel (last axis) weighs more than
# CHANNEL_CAP x the median channel's RMS. The tiny random checkpoints stay under 3x: unchanged there.
CHANNEL_CAP = 8.0


def channel_weights(golden: torch.Tensor) -> torch.Tensor:
    """[C] weights (1, or CHANNEL_CAP x median RMS / RMS for a channel above that) of golden [..., C]."""
    rms = golden.reshape(-1, golden.shape[-1]).pow(2).mean(0).sqrt()
    cap = CHANNEL_CAP * rms.median()
    if cap <= 0:
        return torch.ones_like(rms)
    return torch.where(rms > cap, cap / rms, torch.ones_like(rms))


# Where a hidden state's error sits, by row (token or patch): a bug confined to some rows (the first token's
# massive activation erased, the image pads, the padding, a window edge) shows as most of the error in few
# of them. Said when CONCENTRATED of the squared error sits in at most SPARSE of the rows.
CONCENTRATED, SPARSE, ROWS_LISTED = 0.8, 0.1, 8


# A bug that enters a sequence at one token (the first image pad, the first token after the image, the
# first position past some length) leaves every token before it as close as the rest of the run allows: in a
# causal decoder nothing flows backwards. A per-token bug (a wrong embedding of the image pads) leaves the
# tokens after it alone too. A run of tokens is quiet when its mean squared error (or KL, for logits) is at
# most 1/QUIET of the loud run's: 10x closer in RMS. Precision drift is loud everywhere and says nothing.
QUIET = 100.0


def _best_split(e: torch.Tensor) -> tuple[int, float, float]:
    """(k, mean of e[:k], mean of e[k:]) for the split of row errors e [n >= 2] most likely under two means
    (the likelihood of exponentials: the split that maximises -k log(mean before) - (n-k) log(mean after))."""
    n = e.numel()
    c = e.cumsum(0)[:-1]
    k = torch.arange(1, n, dtype=e.dtype)
    before, after = c / k, (e.sum() - c).clamp(min=0) / (n - k)
    tiny = e.sum() / n * 1e-12 + 1e-300  # an exact run (error 0) is the quietest there is, not -inf
    i = int((-(k * (before + tiny).log() + (n - k) * (after + tiny).log())).argmax())
    return i + 1, before[i].item(), after[i].item()


def _near(n: int) -> int:
    """How many of a run's n rows next to a split are checked to be loud: a quarter, 1 to 8."""
    return max(1, min(8, n // 4))


def loud_span(e: torch.Tensor) -> tuple[int, int]:
    """The run [s, t) of row errors e [n] that holds the error, once every quiet run at either end (QUIET
    times quieter than the rest) is trimmed; (0, n) when none is. A quiet run must end at a step: the few
    loud rows next to it are at least sqrt(QUIET) louder too, so error that grows smoothly along the
    sequence (drift) is no span."""
    s, t = 0, e.numel()
    while t - s >= 2:
        k, before, after = _best_split(e[s:t])
        ahead, behind = e[s + k : s + k + _near(t - s - k)], e[s + k - _near(k) : s + k]  # loud rows by the split
        if before * QUIET <= after and ahead.mean() >= QUIET**0.5 * before:
            s += k
        elif after * QUIET <= before and behind.mean() >= QUIET**0.5 * after:
            t = s + k
        else:
            break
    return s, t


def loud_spans(per_row: torch.Tensor, valid: torch.Tensor) -> list[list[int]]:
    """For each sequence b of per-row errors [B, L] whose error starts after its first valid token or ends
    before its last: [b, first loud token, last loud token, quiet valid tokens before, quiet ones after]. A
    sequence that is quiet as a whole (its mean error QUIET times below the loudest sequence's) holds no
    error to place: its spans would be the shape of its noise."""
    out = []
    means = [
        per_row[b, valid[b].bool()].mean() if valid[b].any() else per_row.new_zeros(()) for b in range(per_row.shape[0])
    ]
    loudest = max(means) if means else 0
    for b in range(per_row.shape[0]):
        idx = valid[b].nonzero().flatten()
        e = per_row[b, idx]
        if idx.numel() < 2 or not bool((e > 0).any()) or means[b] * QUIET <= loudest:
            continue
        s, t = loud_span(e)
        if s > 0 or t < idx.numel():
            out.append([b, int(idx[s]), int(idx[t - 1]), s, idx.numel() - t])
    return out


def future_signature(per_row: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether row errors [B, L] look like attention that sees later tokens: in every sequence the last
    valid token is quiet (it sees every token either way) while the first half of the sequence is loud,
    louder on average than the second half (a token sees more of what it should not the earlier it is)."""
    seen = False
    for b in range(per_row.shape[0]):
        e = per_row[b, valid[b].nonzero().flatten()]
        n = e.numel()
        if n < 4 or not bool((e > 0).any()):
            continue
        first, second = e[: n // 2].mean(), e[n // 2 : -1].mean()
        if not (e[-1] * QUIET <= e.mean() and first >= second and first > 0):
            return False
        seen = True
    return seen


def _index(flat: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(flat, shape)]


def _valid(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The rows [B, L] a mask ([B, L], or None for all) leaves to judge."""
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool().reshape(-1, shape[-1]).expand(shape)


def _weighed(golden: torch.Tensor, got: torch.Tensor, mask, channels: bool):
    """(g, x, w, gw, xw): both masked, then weighed by channel_weights when `channels` and a channel is
    capped (w None when nothing is)."""
    g, x = _masked(golden, got, mask)
    w = channel_weights(g) if channels and g.dim() >= 2 and g.numel() > 0 else None
    w = w if w is not None and bool((w < 1).any()) else None  # nothing capped: weigh nothing
    return g, x, w, *((g, x) if w is None else (g * w, x * w))


def row_errors(golden: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The squared error of each row (every index but the last) of hidden states [..., C], on the channel
    weights float_errors uses: [...]; a row the mask ([B, L]) leaves out is 0."""
    _, _, _, gw, xw = _weighed(golden, got, mask, channels=True)
    return (xw - gw).pow(2).sum(-1)


def error_rows(golden: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None) -> dict | None:
    """Where the error of hidden states [..., C] sits, by row (every index but the last), on the channel
    weights float_errors uses; None for a tensor with no rows.

    -> {"rows": the fewest rows (index lists, worst first, at most ROWS_LISTED) holding CONCENTRATED of
    the squared error when they are at most SPARSE of the rows, else []; "share": their share of it;
    "of": how many rows they are (possibly more than listed); "total": rows; "zero_rows": rows (at most
    ROWS_LISTED) that are all zero in `got` and not in `golden`, a row erased; "zero_count": how many;
    "batch": [b, share] when golden is [B, L, C] with B > 1 and batch row b holds CONCENTRATED of the
    error (a bug of one row of a padded batch), else None; "spans": loud_spans of a [B, L, C] sequence;
    "sees_ahead": future_signature of a [B, L, C] sequence}."""
    if golden.dim() < 2 or golden.numel() == 0:
        return None
    _, _, _, gw, xw = _weighed(golden, got, mask, channels=True)
    shape = tuple(golden.shape[:-1])
    g, x = gw.reshape(-1, golden.shape[-1]), xw.reshape(-1, golden.shape[-1])
    per_row = (x - g).pow(2).sum(-1)  # row_errors, on the weighed pair already at hand
    total = per_row.sum().item()
    out = {"rows": [], "share": 0.0, "of": 0, "total": per_row.numel(), "zero_rows": [], "zero_count": 0, "batch": None}
    out["spans"] = loud_spans(per_row.reshape(shape), _valid(mask, shape)) if len(shape) == 2 else []
    out["sees_ahead"] = future_signature(per_row.reshape(shape), _valid(mask, shape)) if len(shape) == 2 else False
    erased = ((x == 0).all(-1) & (g != 0).any(-1)).nonzero().flatten()
    out["zero_count"] = erased.numel()
    out["zero_rows"] = [_index(int(r), shape) for r in erased[:ROWS_LISTED]]
    if total > 0 and len(shape) == 2 and shape[0] > 1:
        by_batch = per_row.reshape(shape).sum(-1) / total
        b = int(by_batch.argmax())
        out["batch"] = [b, by_batch[b].item()] if by_batch[b] >= CONCENTRATED else None
    if total > 0 and per_row.numel() >= 2:
        ranked, order = per_row.sort(descending=True)
        need = int((ranked.cumsum(0) < CONCENTRATED * total).sum().item()) + 1
        if need <= SPARSE * per_row.numel():
            out["of"] = need
            out["share"] = ranked[:need].sum().item() / total
            out["rows"] = [_index(int(r), shape) for r in order[: min(need, ROWS_LISTED)]]
    return out


def float_errors(
    golden: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None, *, channels: bool = False
) -> dict:
    """rel (relative Frobenius), max_abs, cosine and the worst coordinate of |got - golden|.

    channels: golden is hidden states [..., C]; rel, cosine and the worst coordinate weigh each channel by
    channel_weights (max_abs stays in the stage's units), and "capped" lists the channels weighed down."""
    g, x, w, gw, xw = _weighed(golden, got, mask, channels)
    diff = (x - g).abs()
    dw = (xw - gw).abs()
    gn = gw.norm().item()
    rel = (xw - gw).norm().item() / gn if gn > 0 else (0.0 if diff.max().item() == 0 else math.inf)
    flat = int(dw.argmax()) if diff.numel() else 0
    worst = _index(flat, tuple(g.shape)) if diff.numel() else []
    xn = xw.norm().item()
    cos = float((xw * gw).sum().item() / (gn * xn)) if gn > 0 and xn > 0 else 1.0
    return {
        "rel": rel,
        "max_abs": diff.max().item() if diff.numel() else 0.0,
        "cosine": cos,
        "worst": worst,
        "worst_golden": float(g.reshape(-1)[flat]) if diff.numel() else 0.0,
        "worst_got": float(x.reshape(-1)[flat]) if diff.numel() else 0.0,
        "capped": [] if w is None else [int(i) for i in (w < 1).nonzero().flatten()],
    }


# When a fixture measured no control at a precision, the nearest looser one stands in (stated in the
# tolerance text): rounded inputs borrow their dtype's full control, float16 borrows bfloat16's.
STAND_IN = {"float16-inputs": "float16", "bfloat16-inputs": "bfloat16", "float16": "bfloat16", "float32": "bfloat16"}


def control_at(control: dict | None, precision: str):
    """(the control measured at `precision`, or its stand-in; the precision it was measured at)."""
    control = control or {}
    src = precision
    while src not in control and src in STAND_IN:
        src = STAND_IN[src]
    return control.get(src), src


def _floor(table: dict, precision: str) -> float:
    """Output-rounding floor of the dtype the arithmetic runs in ('float16-inputs' computes in float32)."""
    return table.get(compute_dtype(precision), table["bfloat16"])


def float_budget(control: dict | None, dtype: str) -> tuple[float, str]:
    """Allowed rel_err for a port running a stage at precision `dtype` (conformance/precision.py),
    and the words that say where it came from. `control` maps precision -> the spec's own rel_err."""
    floor = _floor(FLOOR, dtype)
    if dtype == "float64":
        c, src = 0.0, "float64"
    else:
        c, src = control_at(control, dtype)
        c = c or 0.0
    return ALPHA * c + floor, f"{ALPHA:g}x{c:.2e} ({src} control) + {floor:.1e}"


def floats(golden: torch.Tensor, got, *, control: dict | None, dtype: str, mask: torch.Tensor | None = None) -> Verdict:
    got, why = check_tensor(golden, got, floating=True)
    budget, tol = float_budget(control, dtype)
    if why:
        return _error(why, f"rel <= {tol}")
    e = float_errors(golden, got, mask, channels=True)
    ok = e["rel"] <= budget
    if not ok:  # only a failure is located (locate.locate_rows)
        e["rows"] = error_rows(golden, got, mask)
    capped = f" (channels {e['capped']} capped at {CHANNEL_CAP:g}x the median RMS)" if e["capped"] else ""
    return Verdict(
        "pass" if ok else "fail",
        f"rel {e['rel']:.2e} max_abs {e['max_abs']:.2e} cos {e['cosine']:.6f}{capped}",
        f"rel <= {budget:.2e} = {tol}",
        where=f"worst at {e['worst']}: golden {e['worst_golden']:.6g}, got {e['worst_got']:.6g}",
        values={**e, "budget": budget},
    )


def max_abs(golden: torch.Tensor, got, *, limit: float, mask=None) -> Verdict:
    """pixels / cos_sin classes: every element within `limit`."""
    got, why = check_tensor(golden, got, floating=True)
    if why:
        return _error(why, f"max_abs <= {limit:g}")
    e = float_errors(golden, got, mask)
    ok = e["max_abs"] <= limit
    return Verdict(
        "pass" if ok else "fail",
        f"max_abs {e['max_abs']:.2e} rel {e['rel']:.2e}",
        f"max_abs <= {limit:g}",
        where=f"worst at {e['worst']}: golden {e['worst_golden']:.6g}, got {e['worst_got']:.6g}",
        values=e,
    )


def exact_tensor(golden: torch.Tensor, got, mask=None) -> Verdict:
    got, why = check_tensor(golden, got, floating=False)
    if why:
        return _error(why, "equal")
    g, x = golden.long(), got.long()
    diff = g != x
    if mask is not None:  # broadcastable to golden's shape
        diff &= mask.bool().expand_as(g)
    n = int(diff.sum())
    if n == 0:
        return Verdict("pass", "equal", "equal")
    idx = [int(i) for i in diff.nonzero()[0]]
    return Verdict(
        "fail",
        f"{n} of {g.numel()} differ",
        "equal",
        where=f"first at {idx}: golden {int(g[tuple(idx)])}, got {int(x[tuple(idx)])}",
        values={"n_diff": n, "first": idx},
    )


# ---------------------------------------------------------------- logits and tokens


def logit_stats(golden: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None, *, spans=False) -> dict:
    """KL(golden || got) per position (nats) over [B, L, V] logits, and top-1 agreement, on valid positions.
    spans: also {"rows": {"spans": loud_spans}} of the KL per position (where the error sits)."""
    lp = torch.log_softmax(golden.double(), -1)
    lq = torch.log_softmax(got.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, L]
    same = golden.argmax(-1) == got.argmax(-1)
    m = torch.ones_like(kl, dtype=torch.bool) if mask is None else mask.bool()
    kl_v, same_v = kl[m], same[m]
    # a NaN (non-finite logits: a control run past float16's range) ranks worst, and never breaks the search
    kl_inf = kl.nan_to_num(nan=math.inf)
    ranked = torch.where(m, kl_inf, -math.inf)
    worst = [int(i) for i in np.unravel_index(int(ranked.argmax()), tuple(kl.shape))] if kl_v.numel() else []
    rows = {"rows": {"spans": loud_spans(kl_inf.clamp(min=0), m)}} if spans else {}
    return {
        **rows,
        "mean_kl": kl_v.mean().item() if kl_v.numel() else 0.0,
        "max_kl": kl_v.max().item() if kl_v.numel() else 0.0,
        "top1": same_v.double().mean().item() if same_v.numel() else 1.0,
        "positions": int(same_v.numel()),
        "worst": worst,
    }


def logits(golden: torch.Tensor, got, *, control: dict | None, dtype: str, mask=None) -> Verdict:
    """Mean KL within ALPHA x the control's + KL_FLOOR; top-1 disagreement within ALPHA x the control's +
    TOP1_SLACK."""
    got, why = check_tensor(golden, got, floating=True)
    c, src = control_at(control, dtype)
    if dtype == "float64" or c is None:
        c = {"mean_kl": 0.0, "top1": 1.0}
    kl_budget = ALPHA * c["mean_kl"] + _floor(KL_FLOOR, dtype)
    if why:
        return _error(why, f"mean_kl <= {kl_budget:.2e} ({src} control)")
    s = logit_stats(golden, got, mask, spans=True)
    # near-ties flip either way at low precision (a tiny model has many), and which ones flip depends on the
    # CPU's rounding: the disagreement the control shows is budgeted like an error (ALPHA x control), plus
    # TOP1_SLACK and never fewer than three positions. (A Xeon's bfloat16 path flipped 4 more of model_batch's
    # ~200 positions than the fixture machine's.) The KL bound is the main criterion.
    slack = 0.0 if dtype == "float64" else max(TOP1_SLACK, 3.0 / max(1, s["positions"]))
    top1_min = max(0.0, 1.0 - ALPHA * (1.0 - c["top1"]) - slack)
    tol = f"mean_kl <= {kl_budget:.2e}, top1 >= {top1_min:.3f} ({src} control)"
    ok = s["mean_kl"] <= kl_budget and s["top1"] >= top1_min
    if ok:  # only a failure is located (locate.locate_rows)
        del s["rows"]
    return Verdict(
        "pass" if ok else "fail",
        f"mean_kl {s['mean_kl']:.2e} max_kl {s['max_kl']:.2e} top1 {s['top1']:.3f}",
        tol,
        where=f"worst KL at (batch, token) {s['worst']}",
        values=s,
    )


def tokens(
    golden: torch.Tensor,
    golden_topk: torch.Tensor,
    got,
    got_topk=None,
    *,
    golden_logits: torch.Tensor | None = None,
    golden_logprobs: torch.Tensor | None = None,
    got_logprobs=None,
    noise: float | None = None,
    eos=None,
) -> Verdict:
    """Greedy tokens [B, n]: equal until the first divergence of each row. A divergence is allowed only
    at a near tie: the port's pick is in the golden top-5 and its golden logit is within `noise` (the
    logit noise the spec itself shows at the port's precision) of the golden pick's, and (when the
    port gives its own top-5) the golden pick is in the port's. A row that goes on after the golden
    row's eos never passes (after it, padding: the golden pad or any eos id). Where the port gives top-k log-probs, they are judged at every step before
    the divergence: for the ids both sides list, within `noise`. After a divergence the two
    continuations see different prefixes and are not compared. Without golden logits (older fixtures)
    the top-5 rule alone applies."""
    tol = (
        f"equal until a divergence at a near tie (gap <= {noise:.2g} logit)"
        if noise is not None
        else (f"equal until a divergence where each pick is in the other's top-{TOPK}")
    )
    eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if (
        isinstance(got, torch.Tensor)
        and not not_dense(got)
        and got.dim() == 2
        and got.shape[0] == golden.shape[0]
        and got.shape[1] != golden.shape[1]
        and min(got.shape[1], golden.shape[1]) > 0
    ):
        return _other_length(
            golden, golden_topk, got, got_topk, golden_logits, golden_logprobs, got_logprobs, noise, eos_ids
        )
    got, why = check_tensor(golden, got, floating=False)
    if why:
        return _error(why, tol)
    for name, extra in (("top-k", got_topk), ("top-k log-prob", got_logprobs)):
        if extra is not None and tuple(torch.as_tensor(extra).shape[:2]) != tuple(golden.shape):
            return _error(
                f"wrong {name} shape: expected {list(golden.shape)} + [k], got {list(torch.as_tensor(extra).shape)}",
                tol,
            )
    why = _not_token_ids(got, "") or _bad_topk(got, got_topk, got_logprobs, eos_ids)
    if why:
        return _error(why, tol)
    got_topk = None if got_topk is None else torch.as_tensor(got_topk)
    # steps: where each failing row first goes wrong; over: by how many times the noise its log-probs are off
    notes, failed, steps, over = [], [], [], []
    for b in range(golden.shape[0]):
        diff = (golden[b] != got[b]).nonzero()
        s = int(diff[0]) if len(diff) else golden.shape[1]
        if got_logprobs is not None and golden_logprobs is not None and noise is not None:
            lp_bad = logprob_difference(golden_topk[b, :s], golden_logprobs[b, :s], got_topk, got_logprobs, b, noise)
            if lp_bad:
                failed.append(f"row {b}: {lp_bad[1]}")
                steps.append(lp_bad[0])
                over.append(lp_bad[2])
                continue
        if s == golden.shape[1]:
            continue
        g_tok, p_tok = int(golden[b, s]), int(got[b, s])
        ended = [t for t in range(s) if int(golden[b, t]) in eos_ids]
        if ended:
            # the row stopped: what follows is padding, and a port may pad with any eos id (transformers
            # pads with the first when it has no pad id); any other id means it generated on
            on = [t for t in range(s, golden.shape[1]) if int(got[b, t]) != int(golden[b, t])]
            on = [t for t in on if int(got[b, t]) not in eos_ids]
            if on:
                t = on[0]
                steps.append(t)
                failed.append(
                    f"row {b} goes on after eos at step {ended[0]}: step {t} golden {int(golden[b, t])} "
                    f"(padding), got {int(got[b, t])}"
                )
            continue
        top = golden_topk[b, s, :TOPK].tolist()
        ok = p_tok in top
        why = "" if ok else f"{p_tok} is not in the golden top-{TOPK} {top}"
        if ok and golden_logits is not None and noise is not None:
            gap = float(golden_logits[b, s, 0] - golden_logits[b, s, top.index(p_tok)])
            ok = gap <= noise
            why = f"golden logit gap {gap:.3g} > noise {noise:.2g}: not a near tie"
        if ok and got_topk is not None and g_tok not in got_topk[b, s, :TOPK].tolist():
            ok, why = False, f"the golden pick {g_tok} is not in the port's top-{TOPK}"
        (notes if ok else failed).append(
            f"row {b} diverges at step {s}: golden {g_tok}, got {p_tok}" + (f" ({why})" if why else "")
        )
        if not ok:
            steps.append(s)
    if failed:
        values = {"failed": len(failed), "first_step": min(steps)}
        if len(over) == len(failed):  # every row off in its log-probs alone, its tokens the golden ones
            values["logprobs_over_noise"] = max(over)
        return Verdict("fail", failed[0], tol, where="; ".join(failed), values=values)
    metric = "identical" if not notes else f"{len(notes)} row(s) diverge at a near tie"
    return Verdict("pass", metric, tol, where="; ".join(notes))


def _not_token_ids(ids: torch.Tensor, what: str) -> str:
    """'' when every id is >= 0, else where the first negative one is (an id past the vocabulary is caught where
    the vocabulary is known: the file exchange's reader, the golden top-k's comparison)."""
    neg = (ids < 0).nonzero()
    if len(neg):
        b, t = (int(i) for i in neg[0][:2])
        return f"{what}row {b} step {t}: {int(ids[tuple(neg[0])])} is not a token id (ids are >= 0)"
    return ""


def _bad_topk(got: torch.Tensor, got_topk, got_logprobs, eos_ids: set) -> str:
    """'' for a top-k the port gives that can be judged, else why not: integer ids >= 0 that hold the port's
    own pick at every step up to its row's eos (a greedy pick is its top-1, so it is in any top-k: without it
    the top-k is not the port's and its log-probs would never meet the golden ids; after the eos the row is
    padding), and log-probs with no NaN."""
    if got_topk is not None:
        ids = torch.as_tensor(got_topk)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            return f"wrong top-k dtype: expected integer ids, got {ids.dtype}"
        why = _not_token_ids(ids, "top-k ")
        if why:
            return why
        missing = ~(ids == got.unsqueeze(-1)).any(-1)
        is_eos = torch.zeros_like(got, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= got == e
        missing &= (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and with the row's first eos
        if missing.any():
            b, t = (int(i) for i in missing.nonzero()[0])
            return (
                f"row {b} step {t}: the port's top-k {ids[b, t].tolist()[:TOPK]} does not hold its own pick "
                f"{int(got[b, t])}: a greedy pick is the top-1, so these are not the port's top-k"
            )
    if got_logprobs is not None:
        lp = torch.as_tensor(got_logprobs)
        if not lp.is_floating_point():
            return f"wrong top-k log-prob dtype: expected floats, got {lp.dtype}"
        nan = torch.isnan(lp).nonzero()
        if len(nan):
            b, t = (int(i) for i in nan[0][:2])
            return f"row {b} step {t}: the port's top-k log-probs hold NaN ({int(torch.isnan(lp).sum())} in all)"
    return ""


def _other_length(golden, golden_topk, got, got_topk, golden_logits, golden_logprobs, got_logprobs, noise, eos_ids):
    """Tokens [B, m] against a golden [B, n], m != n: the steps both have are judged as usual (a divergence
    there is the first thing wrong), then the length itself, row by row: the golden stops where every row has
    ended with an eos or at max_new_tokens, so a port that stops sooner stopped a row that had not ended (or
    the whole batch when one row ended), and one that goes on generated past an end."""
    k = min(golden.shape[1], got.shape[1])

    def cut(t):
        return None if t is None else torch.as_tensor(t)[:, :k]

    common = tokens(
        golden[:, :k], golden_topk[:, :k], got[:, :k], cut(got_topk), golden_logits=cut(golden_logits),
        golden_logprobs=cut(golden_logprobs), got_logprobs=cut(got_logprobs), noise=noise, eos=sorted(eos_ids),
    )  # fmt: skip
    n, m = golden.shape[1], got.shape[1]
    said = f"{m} steps where the golden has {n}"
    if common.status == "error":
        return _error(f"{said}; {common.metric}", common.tolerance)
    if common.status == "fail":
        return Verdict(
            "fail", common.metric, common.tolerance, where=f"{common.where}; and {said}", values=common.values
        )
    ended = {b: next((t for t in range(n) if int(golden[b, t]) in eos_ids), None) for b in range(golden.shape[0])}
    rows = []
    if m < n:
        for b, end in ended.items():
            if end is None or end >= m:
                nxt = int(golden[b, m])
                rows.append(f"row {b} had not ended (golden step {m}: {nxt})")
        done = [f"row {b} ended with eos at step {t}" for b, t in ended.items() if t is not None and t < m]
        why = f"the port stopped after {m} steps" + (": " + "; ".join(rows) if rows else "")
        if done and rows:
            why += f", while {'; '.join(done)}: the batch stopped when one row ended (stop when every row has)"
        first = m
    else:
        if all(t is not None for t in ended.values()):
            why = f"every golden row ended with an eos by step {n - 1}, yet the port goes on to {m} steps"
        else:
            why = f"the golden stops at max_new_tokens = {n} steps, the port goes on to {m} ({m - n} more)"
        first = n
    tol = common.tolerance
    return Verdict(
        "fail",
        f"{said}: {why}"[:300],
        tol,
        where=f"the first {k} steps agree; {why}",
        values={"failed": 1, "first_step": first},
    )


def logprob_difference(golden_ids, golden_lp, got_ids, got_lp, b, noise) -> tuple[int, str, float] | None:
    """First step where a log-prob the port gives for an id in the golden top-k is off by > noise: (step, why,
    how many times the noise it is off)."""
    if got_ids is None:
        return None
    got_lp = torch.as_tensor(got_lp, dtype=torch.float64)
    for t in range(golden_ids.shape[0]):
        ours = dict(zip(got_ids[b, t].tolist(), got_lp[b, t].tolist()))
        for tok, lp in zip(golden_ids[t].tolist(), golden_lp[t].tolist()):
            if tok in ours and not abs(ours[tok] - lp) <= noise:  # NaN is off too
                off = abs(ours[tok] - lp)
                why = (
                    f"step {t}: log-prob of {tok} is {ours[tok]:.6g}, golden {lp:.6g} "
                    f"(off by {off:.2g} > noise {noise:.2g})"
                )
                return t, why, off / noise
    return None


# ---------------------------------------------------------------- prompts of another length


def token_difference(golden, got) -> str:
    """Where a port's prompt differs from the golden one, per row: inserted and missing ids and at
    which golden position ('row 0: 2 inserted at 40 [151653, 151652]; 1 missing at 70 [13]')."""
    g, x = torch.as_tensor(golden), torch.as_tensor(got)
    rows = []
    for b in range(min(g.shape[0], x.shape[0])):
        sm = difflib.SequenceMatcher(a=g[b].tolist(), b=x[b].tolist(), autojunk=False)
        parts = []
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op in ("insert", "replace"):
                parts.append(f"{j2 - j1} inserted at {i1} {x[b, j1:j2].tolist()[:8]}")
            if op in ("delete", "replace"):
                parts.append(f"{i2 - i1} missing at {i1} {g[b, i1:i2].tolist()[:8]}")
        if parts:
            rows.append(f"row {b}: " + "; ".join(parts[:6]))
    if g.shape[0] != x.shape[0]:
        rows.append(f"{g.shape[0]} rows expected, {x.shape[0]} given")
    return " | ".join(rows) or "same tokens"


def common_positions(golden_ids, port_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, the positions (golden, port) of the tokens both prompts share, in order (the equal
    blocks of a diff of the two id sequences)."""
    out = []
    for b in range(golden_ids.shape[0]):
        sm = difflib.SequenceMatcher(a=golden_ids[b].tolist(), b=port_ids[b].tolist(), autojunk=False)
        gi, pi = [], []
        for block in sm.get_matching_blocks():
            gi += range(block.a, block.a + block.size)
            pi += range(block.b, block.b + block.size)
        out.append((torch.tensor(gi, dtype=torch.int64), torch.tensor(pi, dtype=torch.int64)))
    return out


def align(golden: torch.Tensor, got: torch.Tensor, pairs, axis: int, mask: torch.Tensor | None):
    """golden [.., B, L, ..] and got [.., B, L', ..] gathered on the common positions of each row and
    laid out as one row: ([.., 1, N, ..], [.., 1, N, ..], mask [1, N] (the golden mask there))."""
    g_rows, x_rows, m_rows = [], [], []
    for b, (gi, pi) in enumerate(pairs):
        g_rows.append(golden.select(axis - 1, b).index_select(axis - 1, gi))
        x_rows.append(got.select(axis - 1, b).index_select(axis - 1, pi))
        m_rows.append(torch.ones(len(gi), dtype=torch.int64) if mask is None else mask[b].index_select(0, gi))
    g = torch.cat(g_rows, axis - 1).unsqueeze(axis - 1)
    x = torch.cat(x_rows, axis - 1).unsqueeze(axis - 1)
    return g, x, torch.cat(m_rows)[None]
