"""Bad input through the `jaxft` command: configs, overrides, data, model folders, checkpoints, run
directories and export targets.

Every case in `CASES` must exit with code 2, print a message naming the key, file, row or step, print no
Python traceback, and leave every file of the existing run, export and model folders as it was (hashes
before and after). Cases run in-process through `jaxft.cli.main` (a subprocess costs seconds of imports);
a few run the real command in a subprocess (the lock, real stderr). All cases share one tiny trained run
and its export. README's table "Bad input, and what the user is told" lists each case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, save_tiny_bert
from sft_helpers import make_tokenizer, save_tiny_llama
from jaxft.cli import main

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot"]


class World:
    """The shared model folder, data, config, trained run (steps 2 and 4) and its export."""

    def __init__(self, root: Path, minilm_dir: Path):
        self.root = root
        self.model = save_tiny_bert(root / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir)
        rows = [f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} {i}\t{'pos' if i % 8 < 3 else 'neg'}" for i in range(16)]
        self.train = root / "train.tsv"
        self.train.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
        self.val = root / "val.tsv"
        self.val.write_text("text\tlabel\n" + "\n".join(rows[:8]) + "\n")
        self.run = root / "run"
        self.cfg = root / "c.yaml"
        self.cfg.write_text(f"model: {{name_or_path: {self.model}}}\n"
                            f"data: {{train: {self.train}, validation: {self.val}, max_length: 16, "
                            f"cache_dir: {root / 'cache'}}}\n"
                            "train: {batch_size: 4, steps: 4, eval_every: 2, log_every: 1}\n"
                            f"checkpoint: {{keep: 3}}\noutput_dir: {self.run}\n")
        assert main(["train", str(self.cfg)]) == 0
        self.export = root / "export"
        assert main(["export", str(self.run), str(self.export)]) == 0
        self.llama = save_tiny_llama(root / "llama")  # for the causal-LM (chat template) cases
        self.chat = root / "chat.jsonl"
        self.chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello w1"},
                                                      {"role": "assistant", "content": "world w2"}]}) + "\n")


@pytest.fixture(scope="module")
def w(tmp_path_factory, minilm_dir) -> World:
    return World(tmp_path_factory.mktemp("bad_inputs"), minilm_dir)


@pytest.fixture(autouse=True)
def fresh_log_handler(monkeypatch):
    """`setup_logging` adds one console handler on the sys.stderr of its time; pytest swaps sys.stderr per
    test, so drop it and let each command add its own. Handlers other libraries' earlier tests left on the
    root logger hold streams pytest has since closed: a record reaching them (`datasets` logs the error of
    a file it cannot read) would print "--- Logging error ---" and a traceback that no real run prints, so
    logging's own error report is off here (`logging.raiseExceptions`)."""
    root = logging.getLogger("jaxft")
    for h in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(h)
    monkeypatch.setattr(logging, "raiseExceptions", False)
    yield


def cli(args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse
        return e.code


def snapshot(paths) -> dict[str, str]:
    """sha256 of every file under `paths` (a link: its target), by path."""
    out = {}
    for root in paths:
        root = Path(root)
        for p in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


class Case:
    """Builds one bad input in `tmp`; `keep` collects the folders that must not change."""

    def __init__(self, w: World, tmp: Path):
        self.w, self.tmp = w, tmp
        self.keep = [w.run, w.export, w.model, w.llama, w.train, w.val, w.cfg, w.chat]

    def train(self, *over, out: str = "new"):
        return ["train", self.w.cfg, f"output_dir={self.tmp / out}", *over]

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return p

    def model(self, change) -> Path:
        """A copy of the model folder with `change(folder)` applied."""
        d = self.tmp / "model"
        shutil.copytree(self.w.model, d)
        change(d)
        self.keep.append(d)
        return d

    def run(self, change=None) -> Path:
        """A copy of the trained run with `change(run_dir)` applied."""
        d = self.tmp / "run"
        shutil.copytree(self.w.run, d)
        if change:
            change(d)
        self.keep.append(d)
        return d

    def chat_train(self, *over):
        return self.train(f"model.name_or_path={self.w.llama}", "model.task=causal-lm", f"data.train={self.w.chat}",
                          "data.validation=null", *over)

    def model_train(self, change):
        return self.train(f"model.name_or_path={self.model(change)}")

    def data_train(self, name: str, content, *over):
        return self.train(f"data.train={self.file(name, content)}", *over)


def edit_json(path: Path, fn):
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(fn(obj)))


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def drop_key(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def truncate_checkpoint(run: Path) -> None:
    cut(largest(run / "checkpoints" / "4" / "params"))


def meta_without_data(run: Path) -> None:
    edit_json(run / "checkpoints" / "4" / "meta" / "metadata", drop_key("data"))


def no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def garbage_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not a pickle" * 64)


def index(content: str):
    def change(d: Path) -> None:
        (d / "model.safetensors.index.json").write_text(content)
    return change


def hf_cache_like(c: Case) -> Path:
    """A folder laid out like a Hugging Face cache snapshot: links into a blobs folder."""
    blobs, snap = c.tmp / "blobs", c.tmp / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    (blobs / "abc").write_text("{}")
    (snap / "config.json").symlink_to(blobs / "abc")
    c.keep += [blobs, snap]
    return snap


def link_to_export(c: Case) -> Path:
    (c.tmp / "link").symlink_to(c.w.export)
    c.keep.append(c.tmp / "link")
    return c.tmp / "link"


def tiny_gpt2(c: Case, n_positions: int) -> Path:
    """A tiny random GPT-2 with the word-level chat tokenizer and a position table of `n_positions`."""
    import transformers

    tok, d = make_tokenizer(), c.tmp / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=n_positions, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    c.keep.append(d)
    return d


def lock_links_to(c: Case, target: str):
    """Change a run copy's `.lock` into a symbolic link to `c.tmp/target` (a file, or a path in a folder
    that does not hold it yet), both kept unchanged."""
    victim = c.tmp / target
    victim.parent.mkdir(parents=True, exist_ok=True)
    if target == "victim.txt":
        victim.write_text("another program's file\n")
    c.keep.append(victim.parent if victim.parent != c.tmp else victim)

    def change(run: Path) -> None:
        (run / ".lock").unlink(missing_ok=True)
        (run / ".lock").symlink_to(victim)
    return change


# (id, args given a Case, fragments the error message must hold). `{...}` fragments are formatted with the Case.
CASES = [
    # config file and overrides
    ("config-missing", lambda c: ["train", c.tmp / "nope.yaml"], ["config file", "nope.yaml", "does not exist"]),
    ("config-is-a-folder", lambda c: ["train", c.tmp], ["config file {tmp}", "is a folder"]),
    ("config-not-yaml", lambda c: ["train", c.file("c.yaml", "model: [\n")], ["c.yaml is not valid YAML"]),
    ("config-not-a-mapping", lambda c: ["train", c.file("c.yaml", "- 1\n- 2\n")], ["c.yaml must hold a mapping"]),
    ("unknown-key", lambda c: c.train("optim.lrr=1"), ["'optim.lrr': unknown key; did you mean 'optim.lr'?"]),
    ("override-without-equals", lambda c: c.train("optim.lr"), ["'optim.lr' is not of the form key.sub=value"]),
    ("override-not-yaml", lambda c: c.train("train.steps=[1"), ["'train.steps': '[1' is not valid YAML"]),
    ("override-infinite", lambda c: c.train("train.steps=null", "train.epochs=.inf"),
     ["'train.epochs': Input should be a finite number"]),
    ("override-nan", lambda c: c.train("optim.lr=.nan"), ["'optim.lr': Input should be a finite number"]),
    ("override-wrong-type", lambda c: c.train("train.batch_size=abc"), ["'train.batch_size'", "'abc'"]),
    ("override-into-a-value", lambda c: c.train("optim.lr.x=1"), ["'optim.lr'"]),
    ("mesh-axis-zero", lambda c: c.train("mesh.data=0"), ["mesh.data=0"]),
    ("grad-accum-not-dividing", lambda c: c.train("train.grad_accum=3"), ["train.grad_accum=3"]),
    ("num-labels-with-causal-lm", lambda c: c.train("model.task=causal-lm", "model.num_labels=2"),
     ["model.num_labels applies to sequence-classification"]),
    ("string-override-glob", lambda c: c.train("data.train=*.tsv"), ["data.train: data file *.tsv does not exist"]),
    ("string-override-at-sign", lambda c: c.train("data.text_field=@x"), ["data.text_field='@x' is not a column"]),
    # model folders
    ("model-missing", lambda c: c.train(f"model.name_or_path={c.tmp / 'none'}"), ["model folder {tmp}/none"]),
    ("model-is-a-file", lambda c: c.train(f"model.name_or_path={c.file('m.bin', 'x')}"), ["{tmp}/m.bin"]),
    ("model-without-config", lambda c: c.model_train(lambda d: (d / "config.json").unlink()),
     ["model folder {tmp}/model has no config.json"]),
    ("config-json-invalid", lambda c: c.model_train(lambda d: (d / "config.json").write_text("{bad")),
     ["{tmp}/model/config.json is not valid JSON"]),
    ("config-json-a-list", lambda c: c.model_train(lambda d: (d / "config.json").write_text("[1, 2]")),
     ["{tmp}/model/config.json must hold a JSON object"]),
    ("config-json-without-model-type", lambda c: c.model_train(
        lambda d: edit_json(d / "config.json", drop_key("model_type"))), ["{tmp}/model/config.json has no \"model_type\""]),
    ("unsupported-model-type", lambda c: c.model_train(
        lambda d: edit_json(d / "config.json", lambda o: {**o, "model_type": "foo"})),
     ["{tmp}/model/config.json: unsupported model_type 'foo'"]),
    ("task-unsupported-by-family", lambda c: c.train("model.task=causal-lm"),
     ["config.json: task 'causal-lm' is not available for model_type 'bert'"]),
    ("model-without-weights", lambda c: c.model_train(no_weights), ["model folder {tmp}/model has no weights"]),
    ("garbage-pytorch-bin", lambda c: c.model_train(garbage_bin), ["cannot read PyTorch weights {tmp}/model/pytorch_model.bin"]),
    ("index-without-weight-map", lambda c: c.model_train(index('{"metadata": {}}')),
     ["{tmp}/model/model.safetensors.index.json has no \"weight_map\""]),
    ("index-not-json", lambda c: c.model_train(index("{bad")), ["model.safetensors.index.json is not valid JSON"]),
    ("index-lists-a-missing-shard", lambda c: c.model_train(index('{"weight_map": {"x": "model-2.safetensors"}}')),
     ["lists shard 'model-2.safetensors'"]),
    ("truncated-safetensors", lambda c: c.model_train(lambda d: cut(d / "model.safetensors")),
     ["cannot read safetensors file {tmp}/model/model.safetensors"]),
    ("package-not-a-package", lambda c: c.train("model.name_or_path=package:os/x"), ["package:os/x", "not a package"]),
    ("package-not-installed", lambda c: c.train("model.name_or_path=package:no_such_pkg_jaxft/x"),
     ["package:no_such_pkg_jaxft/x", "is not installed"]),
    ("tokenizer-larger-than-vocab", lambda c: c.model_train(
        lambda d: edit_json(d / "config.json", lambda o: {**o, "vocab_size": 99})), ["vocab_size is 99"]),
    # data
    ("data-missing", lambda c: c.train(f"data.train={c.tmp / 'no.tsv'}"), ["data.train: data file {tmp}/no.tsv"]),
    ("data-is-a-folder", lambda c: c.train(f"data.train={c.tmp}"), ["data.train: {tmp} is a folder"]),
    ("data-unsupported-type", lambda c: c.data_train("d.txt", "x"), ["data.train: cannot read {tmp}/d.txt", "supported"]),
    ("data-text-field-absent", lambda c: c.train("data.text_field=sentence"), ["data.text_field='sentence' is not a column"]),
    ("data-label-field-absent", lambda c: c.train("data.label_field=y"), ["data.label_field='y' is not a column"]),
    ("data-hub-offline", lambda c: c.train("data.train=hf:org/set:train"),
     ["data.train='hf:org/set:train': cannot load the Hub data set 'org/set'"]),
    ("data-hub-spec", lambda c: c.train("data.train=hf:nohub"), ["data.train='hf:nohub'", "hf:NAME[/CONFIG]:SPLIT"]),
    ("data-header-only", lambda c: c.data_train("d.tsv", "text\tlabel\n"), ["data.train: cannot read {tmp}/d.tsv"]),
    ("data-no-usable-row", lambda c: c.data_train("d.tsv", "text\tlabel\n\tpos\n \tneg\n"), ["data.train", "no usable rows"]),
    ("data-bad-row-with-on-bad-rows-error", lambda c: c.data_train("d.tsv", "text\tlabel\ngood\tpos\n\tneg\n",
                                                                   "data.on_bad_rows=error"), ["row 2 of {tmp}/d.tsv"]),
    ("data-jsonl-bad-line", lambda c: c.data_train("d.jsonl", '{"text": "a", "label": "x"}\n{bad\n'),
     ["{tmp}/d.jsonl: line 2 is not valid JSON"]),
    ("data-parquet-garbage", lambda c: c.data_train("d.parquet", b"garbage" * 64), ["cannot read {tmp}/d.parquet"]),
    ("data-validation-label-unseen", lambda c: c.train(f"data.validation={c.file('v.tsv', 'text' + chr(9) + 'label' + chr(10) + 'meh' + chr(9) + 'neutral' + chr(10))}"),
     ["label 'neutral' in row 1 of {tmp}/v.tsv never appears in the train data"]),
    ("data-validation-twice", lambda c: c.train("data.validation_fraction=0.2"),
     ["set data.validation or data.validation_fraction, not both"]),
    ("chat-template-not-jinja", lambda c: c.chat_train("data.chat_template={% for m in messages %}{{ m }"),
     ["data.chat_template is not a valid Jinja template: unexpected '}}'"]),
    ("chat-template-is-a-folder", lambda c: c.chat_train(f"data.chat_template={c.tmp}"),
     ["data.chat_template='{tmp}' is a folder"]),
    ("chat-template-file-missing", lambda c: c.chat_train(f"data.chat_template={c.tmp / 'none.jinja'}"),
     ["data.chat_template='{tmp}/none.jinja' is neither a Jinja template nor an existing file"]),
    ("prompt-completion-not-text", lambda c: c.chat_train(
        f"data.train={c.file('pc.jsonl', json.dumps({'prompt': 'map w1', 'completion': 'd1'}) + chr(10) + json.dumps({'prompt': {'text': 'map w2'}, 'completion': 'd2'}) + chr(10))}",
        "data.format=prompt_completion"),
     ["data.train, row 2, column 'prompt': expected text or a list of {{role, content}} messages, got dict"]),
    # run directories
    ("resume-false-into-a-run", lambda c: ["train", c.w.cfg, "checkpoint.resume=false"],
     ["output_dir {run} holds a run", "checkpoint.resume=false", "checkpoint.overwrite=move"]),
    ("math-change-on-resume", lambda c: ["train", c.w.cfg, "optim.lr=0.01"],
     ["{run} holds a run whose config differs", "optim.lr"]),
    ("output-dir-is-a-file", lambda c: ["train", c.w.cfg, f"output_dir={c.w.train}"], ["output_dir {train} is a file"]),
    ("output-dir-under-a-file", lambda c: ["train", c.w.cfg, f"output_dir={c.w.train}/run"], ["{train} is a file"]),
    ("truncated-checkpoint-on-resume", lambda c: ["train", c.w.cfg, f"output_dir={c.run(truncate_checkpoint)}", "train.steps=6"],
     ["checkpoint step 4 cannot be read", "{tmp}/run/checkpoints/4/params", "to use step 2"]),
    ("checkpoint-meta-without-data", lambda c: ["train", c.w.cfg, f"output_dir={c.run(meta_without_data)}", "train.steps=6"],
     ["checkpoint step 4", "{tmp}/run/checkpoints/4/meta has no 'data' entry"]),
    ("run-config-not-yaml", lambda c: ["export", c.run(lambda r: (r / "config.yaml").write_text("model: [")), c.tmp / "out"],
     ["config file {tmp}/run/config.yaml is not valid YAML"]),
    ("run-labels-corrupt", lambda c: ["export", c.run(lambda r: (r / "labels.json").write_text("{")), c.tmp / "out"],
     ["{tmp}/run/labels.json is not a label map"]),
    ("export-not-a-run", lambda c: ["export", c.tmp, c.tmp / "out"], ["{tmp} is not a jaxft run directory"]),
    ("export-run-without-checkpoint", lambda c: ["export", c.run(lambda r: shutil.rmtree(r / "checkpoints")), c.tmp / "out"],
     ["run {tmp}/run has no checkpoint yet"]),
    ("export-truncated-checkpoint", lambda c: ["export", c.run(truncate_checkpoint), c.tmp / "out"],
     ["checkpoint step 4 cannot be read", "{tmp}/run/checkpoints/4/params"]),
    ("eval-without-checkpoint", lambda c: ["eval", c.w.cfg], ["jaxft eval needs checkpoint=RUN_DIR"]),
    ("eval-of-no-run", lambda c: ["eval", c.w.cfg, f"checkpoint={c.tmp / 'none'}"], ["run {tmp}/none has no checkpoint"]),
    ("generate-classification-run", lambda c: ["generate", c.w.run, "--prompt", "hi"],
     ["{run} is a model.task=sequence-classification run"]),
    ("generate-missing-model", lambda c: ["generate", c.tmp / "none", "--prompt", "hi"], ["model folder {tmp}/none"]),
    ("generate-empty-prompt", lambda c: ["generate", c.w.llama, "--prompt", ""], ["--prompt is empty"]),
    ("lock-is-a-symbolic-link", lambda c: ["train", c.w.cfg, f"output_dir={c.run(lock_links_to(c, 'victim.txt'))}",
                                           "train.steps=6"],
     ["the lock file {tmp}/run/.lock is a symbolic link (to {tmp}/victim.txt)"]),
    ("lock-is-a-dangling-link", lambda c: ["train", c.w.cfg, f"output_dir={c.run(lock_links_to(c, 'elsewhere/x'))}",
                                           "train.steps=6"],
     ["the lock file {tmp}/run/.lock is a symbolic link (to {tmp}/elsewhere/x)"]),
    # batches padded to a data.max_length past a learned position table (refused before output_dir exists: NO_RUN_DIR)
    ("gpt2-max-length-past-n-positions", lambda c: c.chat_train(f"model.name_or_path={tiny_gpt2(c, 64)}",
                                                                "data.max_length=128", "data.padding=max_length",
                                                                "train.batch_size=1"),
     ["data.max_length=128 (data.padding=max_length) is longer than the model's n_positions=64 "
      "({tmp}/gpt2/config.json)"]),
    ("bert-max-length-past-max-position-embeddings", lambda c: c.train("data.max_length=128", "data.padding=max_length"),
     ["data.max_length=128 (data.padding=max_length) is longer than the model's max_position_embeddings=64 "
      "({model}/config.json)"]),
    # export targets
    ("export-target-is-a-file", lambda c: ["export", c.w.run, c.w.train], ["export target {train} is a file"]),
    ("export-target-not-empty", lambda c: ["export", c.w.run, c.w.export], ["{export} is not empty; pass --overwrite"]),
    ("export-target-under-a-file", lambda c: ["export", c.w.run, c.w.train / "out"], ["{train} is a file, not a folder"]),
    ("export-target-is-a-link", lambda c: ["export", c.w.run, link_to_export(c), "--overwrite"],
     ["export target {tmp}/link is a symbolic link"]),
    ("export-target-hf-cache-snapshot", lambda c: ["export", c.w.run, hf_cache_like(c), "--overwrite"],
     ["export target {tmp}/snapshot holds symbolic links"]),
    ("export-target-is-the-run", lambda c: ["export", c.w.run, c.w.run, "--overwrite"], ["would replace {run}"]),
    ("export-target-is-the-base-model", lambda c: ["export", c.w.run, c.w.model, "--overwrite"], ["would replace {model}"]),
    ("export-target-inside-the-run", lambda c: ["export", c.w.run, c.w.run / "checkpoints", "--overwrite"],
     ["export target {run}/checkpoints lies inside the jaxft run directory {run}"]),
    ("export-target-inside-another-run", lambda c: ["export", c.w.run, c.run() / "hf"],
     ["export target {tmp}/run/hf lies inside the jaxft run directory {tmp}/run"]),
    ("export-target-is-another-run", lambda c: ["export", c.w.run, c.run(), "--overwrite"],
     ["export target {tmp}/run is the jaxft run directory {tmp}/run"]),
    ("export-target-holds-a-run", lambda c: ["export", c.w.run, c.run().parent, "--overwrite"],
     ["export target {tmp} holds the jaxft run directory {tmp}/run"]),
    # plan
    ("plan-zero-devices", lambda c: ["plan", c.w.cfg, "--devices", "0"], ["--devices", "0 devices"]),
    ("plan-negative-devices", lambda c: ["plan", c.w.cfg, "--devices", "-4"], ["--devices", "-4 devices"]),
]


# cases refused before anything is written: `output_dir` (`Case.train`'s `{tmp}/new`) is never created
NO_RUN_DIR = {"gpt2-max-length-past-n-positions", "bert-max-length-past-max-position-embeddings"}


def test_at_least_40_bad_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, make, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(w, tmp_path, capfd, monkeypatch, name, make, fragments):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    case = Case(w, tmp_path)
    args = make(case)
    before = snapshot(case.keep)
    capfd.readouterr()
    code = cli(args)
    out, err = capfd.readouterr()
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err and "weights_only=False" not in err, err
    names = dict(tmp=tmp_path, run=w.run, export=w.export, model=w.model, train=w.train)
    for fragment in fragments:
        assert fragment.format(**names) in err, err[-2000:]
    assert snapshot(case.keep) == before, f"{name} changed files of an existing run, export or model"
    if name in NO_RUN_DIR:
        assert not (tmp_path / "new").exists(), f"{name} created output_dir before refusing"


def test_lock_names_the_holder_and_a_dead_holder_frees_it(w, tmp_path, capfd):
    """A second `jaxft train` into a run directory another process holds exits 2 naming that process; the
    lock dies with its holder (here: SIGTERM)."""
    run = tmp_path / "run"
    shutil.copytree(w.run, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from jaxft.train.run import RunLock; "
                               "RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot([run])
        capfd.readouterr()
        assert cli(["train", w.cfg, f"output_dir={run}", "train.steps=6"]) == 2
        err = capfd.readouterr().err
        assert f"output_dir {run} is in use by another jaxft train (pid {holder.pid} on host " \
               f"{socket.gethostname()}" in err, err
        assert snapshot([run]) == before
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    from jaxft.train.run import RunLock

    RunLock(run).release()  # free again


def test_real_command_prints_no_traceback(w, tmp_path):
    """The installed command, with real stderr: a locked run directory and an override that is not YAML."""
    from jaxft.train.run import RunLock

    before = snapshot([w.run])
    lock = RunLock(w.run)
    try:
        locked = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(w.cfg), "train.steps=6"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        lock.release()
    assert locked.returncode == 2 and f"pid {os.getpid()}" in locked.stderr, locked.stderr
    assert "Traceback" not in locked.stderr and snapshot([w.run]) == before
    bad = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(w.cfg), "train.steps=[1",
                          f"output_dir={tmp_path / 'new'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "config key 'train.steps': '[1' is not valid YAML" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def export_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_overwrite_replaces_the_whole_export(w, tmp_path):
    """Stale shards, index and chat template of an earlier export do not survive `--overwrite`."""
    out = tmp_path / "export"
    shutil.copytree(w.export, out)
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "chat_template.jinja"):
        (out / stale).write_text("stale")
    assert cli(["export", w.run, out, "--overwrite"]) == 0
    assert export_files(out) == export_files(w.export)
    assert not list(tmp_path.glob(".export.jaxft-*"))


def test_failed_export_keeps_the_previous_one(w, tmp_path, monkeypatch):
    import jaxft.hf.export as export

    out = tmp_path / "export"
    shutil.copytree(w.export, out)
    before = snapshot([out])
    real = export.write_safetensors_stream

    def fail_after_writing(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # as a Ctrl-C (or a full disk) in the middle of the export

    monkeypatch.setattr(export, "write_safetensors_stream", fail_after_writing)
    with pytest.raises(KeyboardInterrupt):
        cli(["export", w.run, out, "--overwrite"])
    assert snapshot([out]) == before
    assert not list(tmp_path.glob(".export.jaxft-*"))


def test_adapter_export_replaces_the_whole_folder(w, tmp_path, monkeypatch):
    """`export --adapter --overwrite` is staged as the full export is: a failed adapter export leaves the
    previous folder as it was, and a finished one leaves no stale file of it (here: the full export's weights)."""
    import safetensors.numpy

    run = tmp_path / "lora"
    assert cli(["train", w.cfg, f"output_dir={run}", "model.lora.rank=2", "train.steps=1", "train.eval_every=1"]) == 0
    assert cli(["export", run, tmp_path / "fresh", "--adapter"]) == 0
    out = tmp_path / "out"
    shutil.copytree(w.export, out)
    before = snapshot([out])
    real = safetensors.numpy.save_file

    def fail_after_writing(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # as a Ctrl-C (or a full disk) in the middle of the export

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_after_writing)
    with pytest.raises(KeyboardInterrupt):
        cli(["export", run, out, "--adapter", "--overwrite"])
    assert snapshot([out]) == before
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    assert cli(["export", run, out, "--adapter", "--overwrite"]) == 0
    assert export_files(out) == export_files(tmp_path / "fresh") and "model.safetensors" not in export_files(out)
    assert not list(tmp_path.glob(".out.jaxft-*"))


def test_stray_step_folder_and_cut_metrics_line(w, tmp_path, capfd, caplog):
    """An empty `checkpoints/5` is never listed: export takes step 4 with a warning; training moves it aside,
    resumes from step 4 and saves step 5 itself. A cut last line of metrics.jsonl is removed, so the
    resumed run's first line starts a line of its own."""
    run = tmp_path / "run"
    shutil.copytree(w.run, run)
    (run / "checkpoints" / "5").mkdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')
    capfd.readouterr()
    assert cli(["export", run, tmp_path / "out"]) == 0
    assert f"exported step 4 of {run}" in capfd.readouterr().out
    assert f"{run.absolute()}/checkpoints/5 is not a complete checkpoint" in caplog.text, caplog.text

    assert cli(["train", w.cfg, f"output_dir={run}", "train.steps=5"]) == 0
    assert "never committed" in caplog.text and (run / "incomplete_checkpoints" / "5").is_dir()
    assert "resumed from step 4" in (run / "train.log").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (5, "train") in {(r["step"], r["split"]) for r in rows}
    assert (run / "checkpoints" / "5" / "_CHECKPOINT_METADATA").exists()


def test_overwrite_move_sets_the_old_run_aside(w, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(w.run, run)
    before = {k.replace(str(run), ""): v for k, v in snapshot([run]).items()}
    assert cli(["train", w.cfg, f"output_dir={run}", "checkpoint.resume=false", "checkpoint.overwrite=move",
                "train.steps=1", "train.eval_every=1"]) == 0
    (aside,) = tmp_path.glob("run.old-*")
    assert {k.replace(str(aside), ""): v for k, v in snapshot([aside]).items()} == before
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == {1}


def test_string_overrides_keep_the_raw_text():
    from jaxft.config import load_config

    base = {"model": {"name_or_path": "m"}}
    cfg = load_config(None, ["data.train=*.tsv", "data.text_field=@x", "data.chat_template={% if x %}a{% endif %}",
                             "output_dir=2024", "data.validation=null", 'data.label_field="my label"'], base=base)
    assert (cfg.data.train, cfg.data.text_field, cfg.data.chat_template) == ("*.tsv", "@x", "{% if x %}a{% endif %}")
    assert (cfg.output_dir, cfg.data.validation, cfg.data.label_field) == ("2024", None, "my label")


def test_metrics_line_is_repaired_only_when_cut(tmp_path):
    from jaxft.train.logger import repair_last_line

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')  # whole JSON without its newline: kept
    repair_last_line(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    repair_last_line(path)
    assert path.read_text() == '{"step": 1}\n'


def test_the_runs_own_export_folder_is_accepted(w, tmp_path):
    """RUN/export, the run directory's place for exports, is not "inside the run": it is accepted (and
    replaced as a whole on --overwrite), while every other folder inside the run is refused."""
    run = tmp_path / "run"
    shutil.copytree(w.run, run)
    assert cli(["export", run, run / "export"]) == 0
    assert (run / "export" / "config.json").exists()
    assert cli(["export", run, run / "export", "--overwrite"]) == 0
    assert cli(["export", run, run / "tokenizer", "--overwrite"]) == 2

