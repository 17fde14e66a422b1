"""Mistakes of a prefill in chunks (state.chunked): what a chunk after the first is given.

A chunk must take the whole prompt's positions and embeddings at its own offset
(spec.forward.chunk_positions, decoder_stack_in_chunks). The prompt at once is right in each of
these variants; only the chunked generation goes wrong, as in the ports that shipped them.
"""

from __future__ import annotations

import torch

from ...spec import forward as spec_forward
from ...spec import text
from ._base import Mistake, Patched


class ChunkPositionsFromStart(Patched):
    """Every chunk reads the whole prompt's positions from index 0: a later chunk repeats the first
    chunk's positions."""

    def model_patches(self, inputs):
        return [(spec_forward, "chunk_positions", lambda position_ids, start, end: position_ids[..., : end - start])]


class ChunkPositionsFromEnd(Patched):
    """Every chunk takes the last end - start positions of the prompt (a suffix), not those at its offset."""

    def model_patches(self, inputs):
        def suffix(position_ids, start, end):
            return position_ids[..., position_ids.shape[-1] - (end - start) :]

        return [(spec_forward, "chunk_positions", suffix)]


class ChunkVisionRowsLocal(Patched):
    """Each chunk scatters the vision features over its own pad tokens from feature 0: a chunk that starts
    inside a vision span repeats the span's first features instead of continuing them."""

    def model_patches(self, inputs):
        real_scatter, real_stack = text.scatter_vision_features, spec_forward.decoder_stack_in_chunks
        seen = {}

        def scatter(inputs_embeds, input_ids, image_feats, video_feats, config):
            seen.update(ids=input_ids, feats=(image_feats, video_feats))
            return real_scatter(inputs_embeds, input_ids, image_feats, video_feats, config)

        def stack(params, config, x, position_ids, attention_mask, chunk, **kw):
            ids, (image_feats, video_feats) = seen["ids"], seen["feats"]
            parts = []
            for start, end in spec_forward.chunk_spans(x.shape[1], chunk):
                piece, piece_ids = x[:, start:end], ids[:, start:end]
                n_img = int((piece_ids == config.image_token_id).sum())
                n_vid = int((piece_ids == config.video_token_id).sum())
                parts.append(
                    real_scatter(
                        piece,
                        piece_ids,
                        None if image_feats is None or not n_img else image_feats[:n_img],
                        None if video_feats is None or not n_vid else video_feats[:n_vid],
                        config,
                    )
                )
            return real_stack(params, config, torch.cat(parts, dim=1), position_ids, attention_mask, chunk, **kw)

        return [(text, "scatter_vision_features", scatter), (spec_forward, "decoder_stack_in_chunks", stack)]


ENTRIES = [
    Mistake(
        "chunk_positions_from_start",
        "state.chunked",
        "every prefill chunk gets the prompt's positions from index 0: later chunks repeat the first chunk's",
        "Blaizzy/mlx-vlm#1737",
        ChunkPositionsFromStart,
        cases="model_image$",
    ),
    Mistake(
        "chunk_positions_from_end",
        "state.chunked",
        "every prefill chunk gets the prompt's last positions (a suffix slice), not those at its offset",
        "EricLBuehler/mistral.rs#2083",
        ChunkPositionsFromEnd,
        cases="model_image$",
    ),
    Mistake(
        "chunk_vision_rows_local",
        "state.chunked",
        "each prefill chunk scatters vision features from feature 0 over its own pad tokens",
        "EricLBuehler/mistral.rs#2301",
        ChunkVisionRowsLocal,
        cases="model_image$",
    ),
]
