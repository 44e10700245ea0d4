"""The gist cache of a batch of compressed prompts: the structure only. What its states are and
how they are made and used is the backend's (``gist_lightning.backends``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends import Backend, backend_named


def _map_states(fn, states: list) -> list:
    """``fn`` on every tensor of a backend's states (a list of tensors or of tuples of tensors)."""
    return [tuple(fn(t) for t in s) if isinstance(s, tuple) else fn(s) for s in states]


def _zip_states(fn, many: list[list]) -> list:
    """``fn`` on the list of corresponding tensors of several caches' states (same structure)."""
    first = many[0]
    return [tuple(fn([states[i][j] for states in many]) for j in range(len(s))) if isinstance(s, tuple)
            else fn([states[i] for states in many]) for i, s in enumerate(first)]


@dataclass
class GistCache:
    """Compressed prompts of a batch, rows left-padded to the longest (``valid`` marks real entries).

    Made by :func:`~gist_lightning.compress`, used by :func:`~gist_lightning.generate`; kept on disk
    by :class:`~gist_lightning.prompt_cache.CacheStore`. Row i of a cache answers row i of the inputs:
    ``select`` repeats or reorders rows, ``concat`` joins the rows of several caches.

    Args:
        states: the backend's nested list of tensors, each with axis ``backend.seq_dim`` over the
            L kept prompt positions (decoder_kv: one ``(keys, values)`` pair per layer, each
            (B, H_kv, L, D); t5_encoder: one (B, L, d_model) tensor per encoder block plus one for
            the final layer norm).
        valid: (B, L) True at real entries, False at left padding.
        positions: (B, L) the position ids of the kept entries in the full prompt.
        next_position: (B,) the position id of the first token after each prompt.
        num_gist_tokens: k of the prompts.
        condition: the condition it was made under (``gist``, ``pos_control``, ``neg_control``).
        backend: the name of the backend that made it (``decoder_kv``, ``t5_encoder``).
        meta: free-form notes carried along (e.g. what a store recorded).

    Example:
        >>> cache = compress(model, tok, ["Reverse the list.", "Give the first word."], num_gist_tokens=1)
        >>> cache.batch_size, cache.length
        (2, 1)
        >>> cache.nbytes()  # per prompt: 4 layers x (keys + values) x 4 heads x 32 dims x 4 bytes
        4096
        >>> answers = generate(model, tok, cache.select([0, 0, 1]), ["cat dog owl", "red blue", "fig pear"])
        >>> more = GistCache.concat([cache, compress(model, tok, ["Remove every cat."], num_gist_tokens=1)])
        >>> more.batch_size
        3
    """

    states: list
    valid: torch.Tensor  # (B, L) real entries
    positions: torch.Tensor  # (B, L) position ids of the kept entries in the full prompt
    next_position: torch.Tensor  # (B,) position id of the first token after the prompt
    num_gist_tokens: int
    condition: str
    backend: str  # the name of the backend that made it
    meta: dict = field(default_factory=dict)

    @property
    def ops(self) -> Backend:
        """The backend that made it, which knows how to use it."""
        return backend_named(self.backend)

    @property
    def encoder_decoder(self) -> bool:
        """True for an encoder-decoder's cache (the input then continues the source)."""
        return self.ops.encoder_decoder

    @property
    def batch_size(self) -> int:
        """B, the number of cached prompts."""
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        """L, the kept positions of the longest row (padding included)."""
        return self.valid.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor, flat, in order."""
        return [t for s in self.states for t in (s if isinstance(s, tuple) else (s,))]

    def nbytes(self) -> int:
        """Bytes held per cached prompt: valid entries only, averaged over the rows."""
        if not self.length:
            return 0
        rows_x_len = self.batch_size * self.length
        per_entry = sum(t.numel() // rows_x_len * t.element_size() for t in self.tensors())
        return int(per_entry * self.valid.sum().item() / self.batch_size)

    def held_bytes(self) -> int:
        """Bytes its tensors occupy, padding included (what a memory budget must count)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def trimmed(self) -> GistCache:
        """Without the leading columns that no row holds (left padding of rows that were batched
        with longer ones)."""
        used = self.valid.any(0).nonzero()
        start = int(used[0]) if len(used) else self.length
        if not start:
            return self
        seq_dim = self.ops.seq_dim
        cols = torch.arange(start, self.length, device=self.valid.device)
        out = self._map(lambda t: t.index_select(seq_dim, cols), lambda t: t)
        out.valid, out.positions = self.valid[:, start:], self.positions[:, start:]
        return out

    def _map(self, fn_states, fn_rows) -> GistCache:
        return GistCache(
            states=_map_states(fn_states, self.states),
            valid=fn_rows(self.valid),
            positions=fn_rows(self.positions),
            next_position=fn_rows(self.next_position),
            num_gist_tokens=self.num_gist_tokens,
            condition=self.condition,
            backend=self.backend,
            meta=dict(self.meta),
        )

    def select(self, rows: torch.Tensor | list[int]) -> GistCache:
        """Rows ``rows`` of the batch, in that order (repeat a row to reuse one instruction).

        Args:
            rows: row indices; ``[0, 0, 0]`` answers three inputs from the first prompt.

        Returns:
            GistCache: ``len(rows)`` rows.
        """
        rows = torch.as_tensor(rows, device=self.valid.device, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, rows), lambda t: t.index_select(0, rows))

    def to(self, device=None, dtype=None) -> GistCache:
        """The cache on ``device``, its states in ``dtype`` (row metadata keeps its own dtype)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda t: t.to(device=device))

    @staticmethod
    def concat(caches: list[GistCache]) -> GistCache:
        """Stack the rows of several caches into one batch (left-padding the shorter ones).

        Args:
            caches: caches made with the same k, condition and backend.

        Returns:
            GistCache: their rows in order.

        Raises:
            ValueError: the caches differ in k, condition or backend.
        """
        first = caches[0]
        for c in caches[1:]:
            if (c.num_gist_tokens, c.condition, c.backend) != (first.num_gist_tokens, first.condition,
                                                               first.backend):
                raise ValueError("cannot concatenate caches made with different k, condition or backend")
        length = max(c.length for c in caches)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        seq_dim = first.ops.seq_dim
        return GistCache(
            states=_zip_states(lambda ts: torch.cat([pad(t, seq_dim) for t in ts]),
                               [c.states for c in caches]),
            valid=torch.cat([pad(c.valid, 1) for c in caches]),
            positions=torch.cat([pad(c.positions, 1) for c in caches]),
            next_position=torch.cat([c.next_position for c in caches]),
            num_gist_tokens=first.num_gist_tokens,
            condition=first.condition,
            backend=first.backend,
            meta=dict(first.meta),
        )

