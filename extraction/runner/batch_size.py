"""The batch size in force: halved in place on out-of-memory, grown back toward the requested
size once the samples left are short enough.

Samples run longest first, so after a halving every later batch is shorter than the one that
ran out of memory. The growth rule is a budget in tokens (samples x padded length): the most
tokens a batch held since the last halving without running out. The next batch runs at a
larger size (doubling, up to the requested one) only when that batch, full and padded to the
longest sample left, holds no more tokens than the budget. Why that budget and not another:

- it is evidence under the memory conditions now, not before the out-of-memory (whatever filled
  the device may still be there), so a batch before the halving never counts;
- the first batch after a halving is the largest at that size (the lengths only go down), so
  the budget is measured once, right away, and later batches never raise it: it is fixed until
  the next halving. A budget of "the latest batch" would shrink with the samples and a doubled
  batch would almost never fit it;
- memory that grows with the square of the length (attention scores) also stays within what
  ran: 2b x L <= b x L0 means L <= L0 / 2, so 2b x L^2 <= b x L0^2 / 2;
- it is a function of the size, the budget, the changes so far and the samples done, all in
  the checkpoint: a resumed run grows at the same samples as an uninterrupted one, so it cuts
  the same batches and writes the same bytes.

An out-of-memory at a size it grew back to says that memory there is not bound by the tokens a
batch holds (another process took some, or the allocator's pieces no longer fit): the batch
goes back to the size it grew from, which ran, and that size becomes the most the run grows
back to, so no batch is run twice again for a growth the device cannot hold.
"""

from __future__ import annotations

from dataclasses import dataclass

OUT_OF_MEMORY, GREW_BACK = "out_of_memory", "grew_back"


def grown_size(*, current: int, ceiling: int, next_length: int, fit_tokens: int | None) -> int:
    """The size the next batch runs at: the largest of current, 2 x current, 4 x current, ... up
    to ceiling whose full batch, padded to next_length (the longest sample left, since samples
    run longest first), holds at most fit_tokens tokens. current while no budget is known."""
    size = current
    if fit_tokens is None:
        return size
    while size * 2 <= ceiling and size * 2 * next_length <= fit_tokens:
        size *= 2
    return size


@dataclass
class BatchSize:
    """The batch size of one run, as its checkpoint carries it."""

    requested: int
    current: int
    # The most tokens (batch x padded length) a batch held since the last halving; None until
    # a batch ran after it, and while the ceiling is in force (nothing to grow back to).
    fit_tokens: int | None = None
    # Every change of `current`, oldest first: {"at_sample", "from", "to", "why"}.
    changes: tuple[dict, ...] = ()

    @property
    def ceiling(self) -> int:
        """The most the batch grows back to: the requested size, or less once a size it grew back
        to ran out of memory (then the size it grew from). Read from the changes, so a resume has it."""
        ceiling = self.requested
        for before, after in zip(self.changes, self.changes[1:]):
            if before["why"] == GREW_BACK and after["why"] == OUT_OF_MEMORY:
                ceiling = min(ceiling, after["to"])
        return ceiling

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, requested: int) -> BatchSize:
        # A checkpoint written before the budget was kept measures it on its first batch.
        return cls(requested, checkpoint["batch_size"], checkpoint.get("batch_fit_tokens"),
                   tuple(checkpoint.get("batch_size_changes", ())))

    def checkpoint_fields(self) -> dict:
        """What a checkpoint records, so that a resume goes on with the same size and rule."""
        return {"batch_size": self.current, "batch_fit_tokens": self.fit_tokens,
                "batch_size_changes": list(self.changes)}

    def ran(self, tokens: int) -> None:
        """A batch of `tokens` (samples x padded length) ran at the current size."""
        if self.current < self.ceiling:
            self.fit_tokens = max(self.fit_tokens or 0, tokens)

    def halve(self, at_sample: int) -> dict:
        """Out of memory at the current size: the change made. Half the size, or the size it grew
        from where it grew back to this one (that size ran: half of a jump of 2 -> 8 never did)."""
        last = self.changes[-1] if self.changes else None
        to = last["from"] if last and last["why"] == GREW_BACK else self.current // 2
        return self._change(at_sample, to, OUT_OF_MEMORY, fit_tokens=None)

    def grow(self, at_sample: int, next_length: int) -> dict | None:
        """Before the batch starting at `at_sample`: the change made, if the rule lets it grow."""
        ceiling = self.ceiling
        size = grown_size(current=self.current, ceiling=ceiling, next_length=next_length,
                          fit_tokens=self.fit_tokens)
        if size == self.current:
            return None
        return self._change(at_sample, size, GREW_BACK, fit_tokens=self.fit_tokens if size < ceiling else None)

    def _change(self, at_sample: int, to: int, why: str, *, fit_tokens: int | None) -> dict:
        change = {"at_sample": at_sample, "from": self.current, "to": to, "why": why}
        # A new tuple: the checkpoints already handed to the writer keep the list they had.
        self.current, self.fit_tokens, self.changes = to, fit_tokens, (*self.changes, change)
        return change
