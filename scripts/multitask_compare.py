"""Multi-task vs single-task: the same encoder fine-tuned on several tasks at once, and on each task alone
with the same number of examples of it; test accuracy of each task side by side.

    python scripts/multitask_compare.py [--config configs/multitask_sst2_agnews.yaml] [--out runs/multitask_compare]
                                        [--test-rows N] [key=value ...]

1. trains the multi-task config (`tasks:`) in OUT/multi;
2. counts the batches of each task that run drew (`jaxft.data.multitask.draw_task`, a pure function of the
   seed and the batch index) and trains each task alone in OUT/NAME for exactly that many steps, with the task's own
   config (`jaxft.objectives.multitask.task_config`: same model, optimiser, batch size, seed, data fields). The
   single run's batches are then the very batches of that task the multi-task run saw, in the same order;
3. writes OUT/compare.json and prints a table: per task, the two test accuracies and their difference.

`--test-rows N` evaluates on the first N rows of each test split (written to OUT/data/) to bound CPU time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def head_rows(src: str, n: int, dest: Path) -> str:
    """The header and first `n` rows (all, when fewer) of a TSV/CSV file (one row a line, as the shared data is), at `dest`."""
    if Path(src).suffix not in (".tsv", ".csv"):
        raise SystemExit(f"--test-rows works on .tsv/.csv files, not {src}")
    with open(src, encoding="utf-8") as f:
        lines = list(itertools.islice(f, n + 1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(lines), encoding="utf-8")
    return str(dest)


def main(argv=None) -> dict:
    from jaxft.config import load_config
    from jaxft.data.multitask import draw_task
    from jaxft.train.loop import train
    from jaxft.objectives.multitask import task_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "multitask_sst2_agnews.yaml"))
    p.add_argument("--out", default="runs/multitask_compare")
    p.add_argument("--test-rows", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = Path(args.out)

    cfg = load_config(args.config, [*args.overrides, f"output_dir={out / 'multi'}"])
    if args.test_rows:
        tasks = [t.model_copy(update={"test": head_rows(t.test, args.test_rows, out / "data" / f"{t.name}_test.tsv")})
                 if t.test else t for t in cfg.tasks]
        cfg = cfg.model_copy(update={"tasks": tasks})
    multi = train(cfg)
    steps = multi["step"]

    recorded = json.loads((out / "multi" / "tasks.json").read_text())
    probs = [recorded[t.name]["probability"] for t in cfg.tasks]
    drawn = [draw_task(cfg.train.seed, k, probs) for k in range(steps)]
    rows = {}
    for i, spec in enumerate(cfg.tasks):
        n_batches = drawn.count(i)
        single = task_config(cfg, spec)
        single = single.model_copy(update={
            "output_dir": str(out / spec.name),
            "train": single.train.model_copy(update={"steps": n_batches, "early_stopping":
                                                     single.train.early_stopping.model_copy(update={"metric": None})})})
        alone = train(single)
        rows[spec.name] = {"examples_seen": n_batches * cfg.train.batch_size, "multi_task_steps": steps,
                           "single_task_steps": n_batches, "multi_task_test_accuracy": multi["test"][f"{spec.name}/accuracy"],
                           "single_task_test_accuracy": alone["test"]["accuracy"],
                           "test_examples": alone["test"]["examples"]}
        rows[spec.name]["difference_points"] = 100 * (rows[spec.name]["multi_task_test_accuracy"]
                                                      - rows[spec.name]["single_task_test_accuracy"])
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| task | examples seen | multi-task test acc. | single-task test acc. | difference (points) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['examples_seen']} | {r['multi_task_test_accuracy']:.4f} | "
              f"{r['single_task_test_accuracy']:.4f} | {r['difference_points']:+.2f} |")
    return rows


if __name__ == "__main__":
    main()
