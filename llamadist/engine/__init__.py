"""The engine: requests, the scheduler over a paged KV cache, executors, the engine loop.

Layer order: engine sits above runtime. ``request``, ``kv_blocks`` and ``scheduler`` are
pure Python (no torch tensors, no model): they decide which tokens of which requests are
computed each step and which KV blocks hold them, and are unit-tested without a model.
"""

from llamadist.engine.kv_blocks import NULL_BLOCK, BlockPool
from llamadist.engine.request import Request, RequestStatus
from llamadist.engine.scheduler import Chunk, RequestTooLarge, Scheduler, SchedulerStep

__all__ = ["NULL_BLOCK", "BlockPool", "Chunk", "Request", "RequestStatus", "RequestTooLarge",
           "Scheduler", "SchedulerStep"]
