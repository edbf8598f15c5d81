"""The stream of micro-batches a run consumes, by position: resumable, and re-cut when the batch size changes."""

from __future__ import annotations

from lora_trainer.data.dataset import TrainItem, epoch_batches


class MicroBatches:
    """Micro-batch ``n`` of a run is batch ``n % per_epoch`` of epoch ``n // per_epoch`` (each epoch's order
    depends on ``(seed, epoch)`` alone). After the batch size changes (the out-of-memory ladder), positions
    continue in units of the new batch size, exactly as a run resumed from there with that batch size."""

    def __init__(self, items: list[TrainItem], batch_size: int, seed: int, repeats: int) -> None:
        self.items, self.batch_size, self.seed, self.repeats = items, batch_size, seed, repeats
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.per_epoch = len(self._batches(0))

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.items, self.batch_size, seed=self.seed, epoch=epoch,
                                                repeats=self.repeats))
        return self._epoch[1]

    def at(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch)
        return self._batches(epoch)[index]

    def epoch_of(self, position: int) -> int:
        return position // self.per_epoch
