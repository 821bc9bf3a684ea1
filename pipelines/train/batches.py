"""A training worker's micro-batches from one phase's Ray Data shard (pipelines/train/loop.py reads them).

Endless (a new data epoch starts when one ends), sliced out of grouped fetches, resumable mid-epoch, warmed
ahead of the phase that needs them, and closed at phase end so Ray Data shuts the phase's pipeline down.
"""

from __future__ import annotations

import threading

import torch


class Batches:
    """Endless micro-batches from one phase's dataset shard; a new data epoch starts when one ends.

    Each Ray Data batch holds ``per_fetch`` micro-batches and is sliced here (views, no copies); only
    whole micro-batches are used, so what the loop sees does not depend on ``per_fetch``. ``skip``
    micro-batches are discarded at the start of the first epoch (resume_data=skip).

    ``warm()`` starts the pipeline in a background thread and waits there for its first micro-batch:
    the loop warms the next phase's data while the current phase trains, so a phase change does not
    wait for Ray Data to start its preprocessing actors (measured 12-50 s per phase on 2 cores). The
    order of the micro-batches is unchanged."""

    def __init__(self, shard, kwargs: dict, micro: int, per_fetch: int = 1, epoch: int = 0, skip: int = 0) -> None:
        self.shard, self.kwargs, self.micro = shard, dict(kwargs, batch_size=micro * per_fetch, drop_last=False), micro
        self.epoch, self.batch_in_epoch, self.skip, self.it = epoch, 0, skip, None
        self._warming, self._first, self._error = None, None, None

    def warm(self) -> "Batches":
        def first() -> None:
            try:
                self._first = self._pull()
            except BaseException as e:  # re-raised by next(), in the loop's thread
                self._error = e

        self._warming = threading.Thread(target=first, name="slime-warm-data", daemon=True)
        self._warming.start()
        return self

    def _epoch(self):
        m, fetches = self.micro, iter(self.shard.iter_torch_batches(**self.kwargs))
        try:
            for fetched in fetches:
                fetched.pop("sample_hash", None)  # identifies samples; not a model input
                for i in range(len(fetched["input_ids"]) // m):
                    yield {k: v[i * m:(i + 1) * m] for k, v in fetched.items()}
        finally:  # close() mid-epoch: Ray Data's iterator tells the split coordinator this split is done
            getattr(fetches, "close", lambda: None)()

    def close(self) -> None:
        """End the shard's iteration: Ray Data then shuts the phase's pipeline down (its actors and their
        CPUs/GPUs go back to the cluster) instead of keeping it backpressured until the run ends."""
        if self._warming is not None:
            self._warming.join()
            self._warming = self._first = self._error = None
        if self.it is not None:
            self.it.close()
            self.it = None

    def next(self) -> dict[str, torch.Tensor]:
        if self._warming is not None:
            self._warming.join()
            self._warming, first, error, self._first, self._error = None, self._first, self._error, None, None
            if error is not None:
                raise error
            return first
        return self._pull()

    def _pull(self) -> dict[str, torch.Tensor]:
        while True:
            if self.it is None:
                self.it = self._epoch()
                for _ in range(self.skip):  # resume_data=skip: what the checkpoint had consumed
                    next(self.it)
                    self.batch_in_epoch += 1
                self.skip = 0
            try:
                batch = next(self.it)
            except StopIteration:
                if self.batch_in_epoch == 0:
                    raise RuntimeError("the phase's dataset shard yielded no batch (too few rows for the "
                                       "workers x micro_batch_size, or every sample was dropped)") from None
                self.epoch, self.batch_in_epoch, self.it = self.epoch + 1, 0, None
                continue
            self.batch_in_epoch += 1
            return batch
