"""A KV cache of fixed slots for the decode loop: every row owns one slot of fixed length, writes its next
token at its own column and attends only to its own columns.

Fixed shapes are what CUDA graphs need: the decode step's tensors stay at the same addresses step after
step, so one captured graph per batch bucket replays the whole forward with a single launch (see
model.decode_step). transformers' StaticCache writes every row at one shared column, which forces a common
left-padded length on the batch; per-row write positions let rows join and leave at any step instead.

A call whose rows all share a prompt prefix (one reference voice) can keep that prefix once, outside the
slots (`prefix` capacity, `set_prefix`): the slots then hold only each row's own tokens, and the decode step
attends to both (model.attention.prefix_attention).
"""

from __future__ import annotations

from dataclasses import fields

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Columns a slot holds past its `length`, never written or attended. A step's span (at most `length`) then
# never covers a whole slot: dynamo specializes a compiled step on whether its views of the slots are
# contiguous, which they are at a span of the whole slot only, and compiled the step again for that span
# (model.decode_step; minutes with inductor on a GPU).
SPARE_COLUMNS = 1


def round_up(n: int, step: int = 256) -> int:
    """Slot sizes and attention spans come in steps of 256, so that similar batches share one cache and the
    decode step's graphs."""
    return -(-n // step) * step


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values, (slots, kv_heads, length + SPARE_COLUMNS, head_dim), written in
    place. A step attends to the first `span` columns only: the ones in use, rounded up, rather than the whole
    slot its rows reserved."""

    is_compileable = True
    is_sliding = False

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        write_pos: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
    ) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values  # (kv_heads, capacity, head_dim)
        # Shared by all layers: every slot's index, and the column each slot writes its next token to.
        self.rows, self.write_pos = rows, write_pos
        self.length = keys.shape[2] - SPARE_COLUMNS
        self.span = self.length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: the addresses must not change once a graph has been captured

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new token per slot of the first `b` slots, return those slots' keys/values up to span."""
        b = key_states.shape[0]
        if key_states.shape[2] != 1:
            raise ValueError("a SlotCache takes one token per row per step; prefill with a DynamicCache")
        rows, cols = self.rows[:b], self.write_pos[:b]
        self.keys[rows, :, cols] = key_states[:, :, 0]
        self.values[rows, :, cols] = value_states[:, :, 0]
        return self.keys[:b, :, : self.span], self.values[:b, :, : self.span]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.span, 0

    def get_seq_length(self) -> int:
        return 0  # rows differ; the engine always passes position ids and a ready 4-D mask

    def get_max_length(self) -> int:
        return self.length


class SlotCache(Cache):
    """`slots` rows of at most `length` tokens each, generating at most `max_steps` frames each, and every
    per-row tensor the decode step reads and writes: the whole step (sampling included) works in place on
    these buffers, so it can be captured and replayed as one CUDA graph."""

    def __init__(
        self,
        config,
        slots: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device,
        max_steps: int = 0,
        window: int = 0,
        prefix: int = 0,
    ) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, config.num_key_value_heads, length + SPARE_COLUMNS, head_dim)
        self.slots, self.length, self.max_steps, self.window = slots, length, max_steps, window
        self.prefix_capacity, self.prefix_tokens = prefix, 0
        prefix_shape = (config.num_key_value_heads, prefix, head_dim)
        codebooks = config.num_codebooks
        self.rows = torch.arange(slots, device=device)
        self.write_pos = torch.zeros(slots, dtype=torch.long, device=device)
        super().__init__(
            layers=[
                SlotLayer(
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                    self.rows,
                    self.write_pos,
                    torch.zeros(prefix_shape, dtype=dtype, device=device),
                    torch.zeros(prefix_shape, dtype=dtype, device=device),
                )
                for _ in range(config.num_hidden_layers)
            ]
        )
        # Added to the prefix's attention scores: 0 over its tokens, the dtype's minimum past them.
        self.prefix_bias = torch.zeros(prefix, dtype=torch.float32, device=device)
        # An empty slot keeps column 0 visible so its (ignored) attention row never softmaxes over nothing.
        self.mask = torch.zeros((slots, length + SPARE_COLUMNS), dtype=torch.bool, device=device)
        self.mask[:, 0] = True
        self.audio_in = torch.zeros((slots, 1, codebooks), dtype=torch.long, device=device)
        self.position_in = torch.zeros((slots, 1), dtype=torch.long, device=device)

        def per_row(dtype: torch.dtype, *shape: int, fill: float = 0) -> torch.Tensor:
            return torch.full((slots, *shape), fill, dtype=dtype, device=device)

        self.logits = per_row(dtype, codebooks, config.codebook_size)
        self.temperature = per_row(torch.float32)
        self.top_k = per_row(torch.long)
        self.top_p = per_row(torch.float32)
        self.ras_win_len = per_row(torch.long)
        self.ras_max_repeat = per_row(torch.long)
        self.seeds = per_row(torch.long)
        self.steps = per_row(torch.long)
        self.eos_steps = per_row(torch.long, fill=-1)
        self.step_limit = per_row(torch.long)
        self.done_at = per_row(torch.long, fill=-1)  # the step count at which the row finished, -1 before
        self.history = per_row(torch.long, window, codebooks, fill=-1)
        # One spare column: a finished row keeps stepping until the engine next looks, and writes there.
        self.frames = per_row(torch.long, max_steps + 1, codebooks)
        self._free = list(range(slots))

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.layers for t in (layer.keys, layer.values)]
        tensors += [t for layer in self.layers for t in (layer.prefix_keys, layer.prefix_values)]
        tensors += [self.mask, *self._row_state()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """The `n` lowest free slots: keeping rows low keeps the decode bucket small."""
        if n > len(self._free):
            raise RuntimeError(f"{n} rows do not fit in the {len(self._free)} free slots of the KV cache")
        self._free.sort()
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def release(self, slots: list[int]) -> None:
        if not slots:
            return
        index = torch.tensor(slots, device=self.mask.device)
        self.mask[index] = False
        self.mask[index, 0] = True
        self.write_pos[index] = 0
        self._free.extend(slots)

    def reset(self) -> None:
        free = set(self._free)
        self.release([s for s in range(self.slots) if s not in free])
        self.prefix_tokens = 0

    @property
    def prefix_span(self) -> int:
        """Prefix columns a step attends to (0: no shared prefix), rounded up like the slots' span."""
        return min(self.prefix_capacity, round_up(self.prefix_tokens)) if self.prefix_tokens else 0

    def set_prefix(self, cache) -> None:
        """Hold the shared prefix of the rows to come: a one-row DynamicCache of its keys and values. Set
        while no row is in a slot: the rows' slots then hold only what follows it."""
        if len(self._free) != self.slots:
            raise RuntimeError("the shared prefix changes only while every slot is free")
        tokens = cache.layers[0].keys.shape[2]
        if tokens > self.prefix_capacity:
            raise ValueError(f"a prefix of {tokens} tokens exceeds the cache's {self.prefix_capacity}")
        for mine, theirs in zip(self.layers, cache.layers, strict=True):
            mine.prefix_keys[:, :tokens] = theirs.keys[0]
            mine.prefix_values[:, :tokens] = theirs.values[0]
        self.prefix_bias.fill_(torch.finfo(torch.float32).min)
        self.prefix_bias[:tokens] = 0
        self.prefix_tokens = tokens

    def prefix_for(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's prefix keys and values, (kv_heads, span, head_dim), and their (span,) score bias."""
        span = self.prefix_span
        mine = self.layers[layer]
        return mine.prefix_keys[:, :span], mine.prefix_values[:, :span], self.prefix_bias[:span]

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Move rows to free slots, keys, values and state alike: packing rows into low slots lets the
        decode step run on a smaller bucket once rows have left."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.mask.device)
        dst = torch.tensor(targets, device=self.mask.device)
        for layer in self.layers:
            layer.keys[dst] = layer.keys[src]
            layer.values[dst] = layer.values[src]
        for t in (self.mask, self.write_pos, self.audio_in, self.position_in, *self._row_state()):
            t[dst] = t[src]
        taken = set(targets)
        self._free = [s for s in self._free if s not in taken]
        self.release(sources)

    def _row_state(self) -> tuple[torch.Tensor, ...]:
        return (
            self.logits, self.temperature, self.top_k, self.top_p, self.ras_win_len, self.ras_max_repeat,
            self.seeds, self.steps, self.eos_steps, self.step_limit, self.done_at, self.history, self.frames,
        )  # fmt: skip

    def fits(self, slots: int, length: int, max_steps: int, window: int, prefix: int = 0) -> bool:
        return (
            self.slots >= slots
            and length <= self.length <= 2 * length
            and self.max_steps >= max_steps
            and self.window >= window
            and self.prefix_capacity >= prefix
        )

    def admit(self, slots: list[int], prefill) -> tuple[list[int], list[int]]:
        """Move a prefilled group (a model.batch_state.DynamicBatch) into `slots`: its keys and values, its
        next-frame logits and its sampling state. A row may take as many steps as its slot has columns left
        for (and the frame buffer room), up to its max_steps (max_new_tokens): a slot sized for a shorter
        estimate of the row's audio, or for a longer row, lets it run on. Returns each row's token count and
        step limit."""
        index = torch.tensor(slots, device=self.mask.device)
        counts = self.load(slots, prefill.cache, prefill.attention, skip=self.prefix_tokens)
        room = torch.tensor([self.length - n for n in counts], device=self.mask.device).clamp(
            max=self.max_steps
        )
        limits = torch.minimum(prefill.max_steps, room)
        self.logits[index] = prefill.logits.to(self.logits.dtype)
        for f in fields(prefill.params):
            getattr(self, f.name)[index] = getattr(prefill.params, f.name)
        self.steps[index] = 0
        self.eos_steps[index] = -1
        self.done_at[index] = -1
        self.step_limit[index] = limits
        self.history[index] = -1
        self.position_in[index, 0] = prefill.positions
        return counts, limits.tolist()

    def load(self, slots: list[int], cache, attention: torch.Tensor, skip: int = 0) -> list[int]:
        """Copy a prefill (a DynamicCache and its (b, P) attention mask, padding anywhere: left, or between a
        shared prefix and a row's own tokens) into `slots`, each row's tokens moved in order to the front of
        its slot; the first `skip` columns (the prefix this cache holds once) stay out. Returns each row's
        token count in its slot."""
        attention = attention[:, skip:]
        rows, prompt = attention.shape
        if prompt > self.length:
            raise ValueError(f"a prompt of {prompt} tokens does not fit a KV slot of {self.length}")
        index = torch.tensor(slots, device=self.mask.device)
        counts = attention.sum(dim=1)
        # A stable sort of "is padding" lists each row's real columns first, in their order.
        order = torch.sort((attention == 0).to(torch.int8), dim=1, stable=True).indices
        for mine, theirs in zip(self.layers, cache.layers, strict=True):
            keys, values = theirs.keys[:, :, skip:], theirs.values[:, :, skip:]
            gather = order[:, None, :, None].expand_as(keys)
            mine.keys[index, :, :prompt] = keys.gather(2, gather)
            mine.values[index, :, :prompt] = values.gather(2, gather)
        self.mask[index] = False
        self.mask[index, :prompt] = torch.arange(prompt, device=attention.device)[None, :] < counts[:, None]
        self.write_pos[index] = counts
        return counts.tolist()
