"""What every architecture backend provides: the masked full forward, compression of a prompt
into cached states, the forward of what follows a cache, and one step of greedy decoding.
A backend is stateless; what it keeps between decoding steps it returns to the caller."""

from __future__ import annotations

import torch


class Backend:
    name: str = ""
    encoder_decoder: bool = False  # the encoder-decoder templates and batching (right-padded sources)
    seq_dim: int = 0  # the axis of every cached state tensor that runs over prompt positions
    can_compile: bool = False  # decodes in static buffers (start_static / step_static) through torch.compile

    def cannot_cache(self, condition: str) -> str | None:
        """Why prompts of ``condition`` cannot be cached by this backend (None: they can)."""
        return None

    def forward(self, model, input_ids, attention_mask, gist_token_id, condition, num_gist_tokens=None,
                segment_ids=None, **kwargs):
        """The masked full-prompt forward (training, and the reference a cache must equal);
        ``segment_ids`` (B, S) for packed rows (several examples per row, decoder-only)."""
        raise NotImplementedError

    def compress(self, model, prompt_ids, attention_mask, gist_token_id, condition, cols: slice) -> list:
        """The states of the prompt columns ``cols`` (what later tokens may see), as a nested list of
        tensors whose axis ``seq_dim`` runs over those columns."""
        raise NotImplementedError

    def empty_states(self, model, batch_size: int) -> list:
        """States of a cache that holds nothing (the whole prompt is fed after it)."""
        raise NotImplementedError

    def continuation(self, model, cache, input_ids, attention_mask, **kwargs):
        """One forward of what follows the gist span, from ``cache``; returns the model output."""
        raise NotImplementedError

    def start(self, model, cache, input_ids, attention_mask) -> tuple[torch.Tensor, object]:
        """Greedy decoding, first forward: (logits of the first new token (B, V), decoding state)."""
        raise NotImplementedError

    def step(self, model, state, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Greedy decoding, one more token (B,): (logits of the next one (B, V), new state)."""
        raise NotImplementedError

    def select_rows(self, state, rows: torch.Tensor) -> object:
        """The decoding state of rows ``rows`` (B',) alone, in that order (finished requests leave a
        running batch). May reuse ``state``'s tensors; ``state`` is not used afterwards."""
        raise NotImplementedError

    def merge(self, states: list) -> object | None:
        """One decoding state holding the rows of ``states`` in order, so that requests started at
        different times decode in one batch; None where this backend keeps them apart."""
        return None

    def context_length(self, config) -> int | None:
        """How many positions a prompt plus its new tokens may span (None: no fixed limit)."""
        raise NotImplementedError

    def bytes_per_position(self, model) -> int:
        """Bytes a cache holds per kept prompt position, from the model's shape and dtype."""
        raise NotImplementedError

    def named_tensors(self, states: list) -> dict[str, torch.Tensor]:
        """The states as named tensors (for a cache file)."""
        raise NotImplementedError

    def states_from(self, tensors: dict[str, torch.Tensor]) -> list:
        """The inverse of :meth:`named_tensors`."""
        raise NotImplementedError
