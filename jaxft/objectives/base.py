"""The interface every objective gives the training loop (`jaxft.train.loop`), with the defaults of an
offline objective, whose train batches come straight from its data:

    obj.splits               {"train" | "validation" | "test": batches}
    obj.model_kwargs         extra `load_model` arguments (e.g. num_labels)
    obj.loss                 the loss function (`jaxft.train.losses`): sums and their weight
    obj.eval_loss            the loss evaluation uses (default: `loss`)
    obj.frozen_model(start)  a frozen second model held beside the train state (a reference, a teacher),
                             or None; `start()` gives the policy's starting point as a `Functional`
    obj.steps_per_epoch      optimizer steps in one pass over the train split
    obj.train_batch(step, fn, params)
                             the host batch of optimizer step `step + 1`; an online objective (GRPO) makes it
                             with the current parameters `params` of the policy `fn`
    obj.data_state() / obj.restore_data_state(saved)
                             what a checkpoint records of the data (JSON), so a resumed run continues exactly
    obj.train_metrics(sums, n_steps)   log metrics from step-metric sums over a logging window
    obj.on_log(step, logger)  after each train log line: anything else the objective writes (GRPO: rollouts)
    obj.evaluate(eval_step, params, split, mesh)   metrics over a whole split (`eval_step.fn` is the policy)
    obj.export_kwargs        extra `save_pretrained` arguments (labels, chat template)

The loop never asks which objective it runs.
"""

from __future__ import annotations


class Objective:
    model_kwargs: dict = {}
    export_kwargs: dict = {}
    splits: dict

    def frozen_model(self, start):
        return None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.splits["train"])

    def train_batch(self, step: int, fn, params) -> dict:
        return self.splits["train"].next()

    def on_log(self, step: int, logger) -> None:
        pass

    def data_state(self) -> dict:
        return self.splits["train"].position.to_json()

    def restore_data_state(self, saved: dict) -> None:
        train = self.splits["train"]
        train.position = train.position.from_json(saved)   # Position or MultiPosition
