"""Multi-task training batches: which task each batch comes from, seeded and resumable.

Each training batch comes from one task. Batch `k` of the run picks task `i` with probability `p_i`,
drawn from a generator seeded with `(seed, k)`, so the stream of tasks is a pure function of the seed
and the batch index; within the task the batch is that task's next one (its own `Batches`, shuffled
per epoch as in single-task runs). The whole iterator state is the number of batches drawn plus every
task's `Position`: a resumed run draws exactly the batches the uninterrupted one would have.

Why one task per batch rather than mixed batches: the padded width and the examples' lengths stay those
of one data set (AG News rows are ~3x longer than SST-2's), the proportions hold batch by batch in
expectation, and the shared head (`jaxft.objectives.multitask`) makes every task's batch the same program,
so nothing compiles per task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxft.data.batches import Batches, Position

STRATEGIES = ("proportional", "temperature", "fixed")


def task_probabilities(sizes: list[int], strategy: str, temperature: float = 2.0,
                       weights: list[float | None] | None = None) -> np.ndarray:
    """The sampling distribution over tasks: `p_i ∝ n_i` (proportional), `∝ n_i^(1/T)` (temperature,
    as in multilingual BERT/T5 mixing: T > 1 lifts small tasks), or `∝ weights_i` (fixed)."""
    n = np.asarray(sizes, np.float64)
    if strategy == "proportional":
        raw = n
    elif strategy == "temperature":
        raw = n ** (1.0 / temperature)
    elif strategy == "fixed":
        raw = np.asarray(weights, np.float64)
    else:
        raise ValueError(f"sampling.strategy={strategy!r} is not one of {STRATEGIES}")
    return raw / raw.sum()


def draw_task(seed: int, k: int, probs) -> int:
    """The task index of a run's batch `k` (0-based): a pure function of the seed and `k`."""
    return int(np.random.default_rng([seed, 0x7A5C, k]).choice(len(probs), p=np.asarray(probs, np.float64)))


@dataclass
class MultiPosition:
    """Where a multi-task stream is: batches drawn so far and each task's own position."""

    draws: int
    tasks: dict[str, Position]

    def to_json(self) -> dict:
        return {"draws": self.draws, "tasks": {k: p.to_json() for k, p in self.tasks.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "MultiPosition":
        return cls(int(d["draws"]), {k: Position.from_json(p) for k, p in d["tasks"].items()})


class MultiTaskBatches:
    """Training batches of several tasks (`{name: Batches}`), task `i` drawn with probability `probs[i]`.

    `len()` is the batches of one epoch of every task together, so `train.epochs` counts passes over all
    the data whatever the mix.
    """

    def __init__(self, tasks: dict[str, Batches], probs: np.ndarray, seed: int):
        self.tasks, self.names = tasks, list(tasks)
        self.probs, self.seed, self.draws = np.asarray(probs, np.float64), seed, 0

    def __len__(self) -> int:
        return sum(len(b) for b in self.tasks.values())

    def task_at(self, k: int) -> int:
        return draw_task(self.seed, k, self.probs)

    def next(self) -> dict[str, np.ndarray]:
        name = self.names[self.task_at(self.draws)]
        self.draws += 1
        return self.tasks[name].next()

    @property
    def position(self) -> MultiPosition:
        return MultiPosition(self.draws, {k: b.position for k, b in self.tasks.items()})

    @position.setter
    def position(self, pos: MultiPosition) -> None:
        if set(pos.tasks) != set(self.tasks):
            raise ValueError(f"the checkpoint's data position names tasks {sorted(pos.tasks)}, the config "
                             f"{sorted(self.tasks)}")
        self.draws = pos.draws
        for k, p in pos.tasks.items():
            self.tasks[k].position = p
