"""Which KV-cache blocks hold which request's tokens: a pool of fixed-size blocks with
reference counts and a prefix cache. Pure bookkeeping: the tensors live in the runtime,
one ``(num_blocks, block_size, H_kv, D)`` K and V per layer on each stage, indexed by the
block ids handed out here (principle 6: the runtime owns the cache, the scheduler
allocates).

Block 0 (``NULL_BLOCK``) is never handed out. Kernels and CUDA graphs pad block tables
and the slots of padding rows with it, so a padded row writes and reads a block that no
request owns. The pool therefore has ``num_blocks - 1`` usable blocks.

Prefix caching (the idea of vLLM's v1 KV-cache manager, written afresh here):

* A block that is full of computed tokens gets a key, a hash chain over the tokens from
  the start of the sequence: ``key = hash((parent_key, tuple(block_tokens)))`` with
  ``parent_key = None`` for the first block. Equal keys mean equal whole prefixes (up to
  64-bit hash collisions; the block's own tokens and parent key are also compared on a
  hit, so a collision must match both).
* ``match_prefix`` walks the chain from the first block and returns the longest run of
  cached blocks, leaving at least one token to compute so the request gets logits.
* Blocks are reference counted. Cached blocks are never written again (a request only
  writes past its computed tokens, which start a fresh block after a prefix hit), so
  sharing needs no copy-on-write.
* A block whose count drops to 0 stays cached and findable until its memory is needed.
  Free blocks come from two lists: blocks holding nothing cached first, then cached ones
  in LRU order of their release. A request's blocks are released last-block-first, so
  the tail of a sequence is evicted before its head (a head block is worth more: every
  block after it is only reachable through it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from llamadist.engine.request import Request

NULL_BLOCK = 0

BlockKey = int  # hash((parent_key, tuple(token_ids)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` token slots; block 0 reserved (see module
    docstring). ``prefix_caching=False`` turns every cache lookup into a miss."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (block 0 is the null "
                             f"block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks  # registered key, if cached
        self._content: list[tuple | None] = [None] * num_blocks  # (parent_key, tokens)
        self._cached: dict[BlockKey, int] = {}                   # key -> block id
        self._clean: list[int] = list(range(num_blocks - 1, 0, -1))  # free, caching nothing
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; LRU first
        self._keys: dict[Request, list[BlockKey]] = {}  # keys of each request's full blocks

    def forget_cache(self) -> None:
        """The cache's contents are gone (its device or process was lost): no block may be
        reused as a cached prefix. Only for a pool no request holds blocks of."""
        if any(self._ref[1:]):
            raise RuntimeError("forget_cache with blocks still held by requests")
        self.__init__(self.num_blocks, self.block_size, self.prefix_caching)

    # ---- gauges ----------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used, or cached with no reference."""
        return len(self._clean) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by ``match_prefix`` (referenced or not)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._key[block_id] is not None

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache ----------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """The longest run of cached full blocks that starts ``token_ids``, and the tokens
        they hold. Never the whole sequence: one token at least is left to compute. Takes
        no reference: pass the blocks to ``allocate`` to share them."""
        if not self.prefix_caching:
            return [], 0
        bs = self.block_size
        blocks: list[int] = []
        parent: BlockKey | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            key = hash((parent, tokens))
            block = self._cached.get(key)
            if block is None or self._content[block] != (parent, tokens):
                break
            blocks.append(block)
            parent = key
        return blocks, len(blocks) * bs

    # ---- allocation ------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int,
                 prefix_blocks: Sequence[int] = ()) -> bool:
        """Append blocks so the request can hold ``num_computed + num_new_tokens`` tokens;
        all or nothing (False: nothing changed).

        ``prefix_blocks`` (from ``match_prefix``; only for a request holding no blocks and
        nothing computed) become the request's first blocks, shared, and count as
        computed: on success the caller sets ``num_computed = len(prefix_blocks) *
        block_size``. Cached blocks with no reference count as free, so sharing one uses
        up a free block too; that is counted before anything is taken."""
        prefix = list(prefix_blocks)
        if prefix and (request.block_ids or request.num_computed):
            raise ValueError(f"prefix blocks are for a request that holds no blocks; "
                             f"request {request.id!r} holds {len(request.block_ids)} and has "
                             f"{request.num_computed} tokens computed")
        held = len(request.block_ids) + len(prefix)
        total = request.num_computed + len(prefix) * self.block_size + num_new_tokens
        need = max(0, self.blocks_for(total) - held)
        revived = sum(1 for b in prefix if self._ref[b] == 0)
        if need + revived > self.num_free:
            return False
        for b in prefix:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        if prefix:
            request.block_ids = prefix
            self._keys[request] = [self._key[b] for b in prefix]
        request.block_ids.extend(self._take_free() for _ in range(need))
        return True

    def _take_free(self) -> int:
        if self._clean:
            block = self._clean.pop()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently released
            self._uncache(block)
        self._ref[block] = 1
        return block

    def _uncache(self, block: int) -> None:
        key = self._key[block]
        if key is not None and self._cached.get(key) == block:
            del self._cached[key]
        self._key[block] = None
        self._content[block] = None

    def commit(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens, so later
        requests can share them. A block whose key is already cached (another request
        computed the same prefix at the same time) stays private; its key still chains."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = min(request.num_computed // bs, len(request.block_ids))
        keys = self._keys.get(request)
        if keys is None:
            keys = self._keys[request] = []
        elif len(keys) >= full:
            return  # no block filled since the last commit (most decode steps)
        for i in range(len(keys), full):
            parent = keys[i - 1] if i else None
            tokens = tuple(request.tokens(i * bs, (i + 1) * bs))
            key = hash((parent, tokens))
            keys.append(key)
            block = request.block_ids[i]
            if self._key[block] is None and key not in self._cached:
                self._cached[key] = block
                self._key[block] = key
                self._content[block] = (parent, tokens)

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first. Blocks left with none stay
        cached (evictable) if they hold a registered prefix, else become clean."""
        for b in reversed(request.block_ids):
            self._ref[b] -= 1
            if self._ref[b] < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            if self._ref[b] == 0:
                if self._key[b] is not None:
                    self._evictable[b] = None
                else:
                    self._clean.append(b)
        request.block_ids = []
        self._keys.pop(request, None)
