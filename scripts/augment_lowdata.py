"""Low-data comparison for `data.augment` (issue 13): all-MiniLM-L6-v2 fine-tuned on the first N SST-2 train
rows with and without EDA copies, the same number of optimizer steps each, both evaluated on the SST-2 test
split (the 872 labelled GLUE dev rows). Prints one line per run and a summary, and writes RESULTS.json.

    python scripts/augment_lowdata.py                       # 200 rows, 8 copies, 150 steps, seed 0
    python scripts/augment_lowdata.py --seeds 0 1 2 --steps 150 --copies 8 --synonyms syn.tsv

Synonyms: --synonyms FILE, else WordNet (nltk + Debian's wordnet-base); without either, synonym replacement
and insertion are switched off and only swap and deletion run (said in the output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"), help="folder of train.tsv, test.tsv")
    p.add_argument("--rows", type=int, default=200, help="first N train rows")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--copies", type=int, default=8, help="EDA copies per example in the augmented runs")
    p.add_argument("--alpha", type=float, default=0.1, help="rate of every EDA operation")
    p.add_argument("--synonyms", default=None, help="synonym file (default: WordNet when installed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "augment_lowdata"))
    args = p.parse_args()

    from jaxft.config import load_config
    from jaxft.data.augment import WordNetSynonyms
    from jaxft.train.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ops = {op: args.alpha for op in ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")}
    if args.synonyms is None and WordNetSynonyms.installed() is None:
        print("no synonym file and no WordNet: synonym replacement and insertion off", flush=True)
        ops.update(synonym_replacement=0, random_insertion=0)
    data = Path(args.data)
    base = [f"data.train={data / 'train.tsv'}", f"data.test={data / 'test.tsv'}", f"data.max_train_rows={args.rows}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.eval_batch_size=64",
            f"optim.lr={args.lr}", "train.log_every=50", "checkpoint.resume=false", "checkpoint.overwrite=move"]
    augment = [f"data.augment.copies={args.copies}"] + [f"data.augment.{k}={v}" for k, v in ops.items()]
    if args.synonyms:
        augment.append(f"data.augment.synonyms={args.synonyms}")

    results = []
    for seed in args.seeds:
        for name, extra in (("plain", []), ("eda", augment)):
            t = time.time()
            cfg = load_config(ROOT / "configs" / "sst2_minilm.yaml",
                              base + extra + [f"train.seed={seed}", f"output_dir={out / f'{name}_seed{seed}'}"])
            summary = train(cfg)
            row = {"run": name, "seed": seed, "test_accuracy": summary["test"]["accuracy"],
                   "test_examples": summary["test"]["examples"], "seconds": round(time.time() - t, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
            (out / "RESULTS.json").write_text(json.dumps({"args": vars(args), "operations": ops, "runs": results},
                                                         indent=1))
    for name in ("plain", "eda"):
        acc = [r["test_accuracy"] for r in results if r["run"] == name]
        print(f"{name}: test accuracy {statistics.mean(acc):.4f} (runs: {', '.join(f'{a:.4f}' for a in acc)})")


if __name__ == "__main__":
    main()
