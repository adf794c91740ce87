"""`tfds:NAME[/CONFIG]:SPLIT` sources (jaxft/data/tfds_source.py), with no network and no TensorFlow.

The data set is a real one on disk: a tiny `tfds.core.GeneratorBasedBuilder` prepared in the ArrayRecord
format into a temporary `data.tfds_data_dir`, then read by name from its files (the builder class is kept
out of TFDS's registry, as in a user's run, where only the prepared files exist). `tfds.testing.mock_data`
is not enough on its own: it replaces the ArrayRecord reader with random examples (text as str, never the
bytes real files give) and accepts any split name, and its `__getitems__` (the batched read jaxft uses) fails
with a TypeError in tensorflow-datasets 4.9.10.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import missing, save_tiny_bert
from jaxft.cli import main
from jaxft.data.sources import DataError, load_table

try:
    import tensorflow_datasets as tfds
except ImportError:  # the `tfds` extra (in `test`): skipped on a developer's machine without it, fails in CI
    tfds = None

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "cast", "music", "très", "café"]
N_TRAIN, N_TEST = 40, 6
BAD_ROW = 7  # its text is not valid UTF-8


def example(i: int) -> dict:
    rng = np.random.RandomState(i)
    words = list(rng.choice(WORDS, 5))
    text = f"{' '.join(words)} {i}".encode()
    return {"sentence": text + b" \xff" if i == BAD_ROW else text,
            "label": int(bool(set(words) & {"good", "great", "fine"})), "idx": i,
            "scores": np.array([i, -0.5], np.float32)}


def tiny_reviews_builder():
    """A builder of two splits of sentences with a ClassLabel, an int and an array feature, in two configs
    (`full`, the default, and `short`: train rows 0-4 only), kept out of TFDS's registry: our code finds the
    data set by name from its prepared files only."""
    with tfds.core.registered.skip_registration():
        class TinyReviews(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="full"), tfds.core.BuilderConfig(name="short")]

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"]),
                    "idx": np.int32, "scores": tfds.features.Tensor(shape=(2,), dtype=np.float32)}))

            def _split_generators(self, dl_manager):
                short = self.builder_config.name == "short"
                return {"train": self._generate_examples(0, 5 if short else N_TRAIN),
                        "test": self._generate_examples(N_TRAIN, N_TEST)}

            def _generate_examples(self, start, n):
                for i in range(start, start + n):
                    yield i, example(i)
    return TinyReviews


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    if tfds is None:
        missing("tensorflow-datasets is not installed: pip install 'jaxft[tfds]'")
    root = tmp_path_factory.mktemp("tfds")
    for config in ("full", "short"):
        tiny_reviews_builder()(config=config, data_dir=str(root), file_format="array_record").download_and_prepare()
    return root


def test_columns_text_decoded_labels_ints(data_dir):
    t = load_table("tfds:tiny_reviews:train", "data.train", tfds_data_dir=str(data_dir))
    assert sorted(t) == ["idx", "label", "scores", "sentence"]
    assert sorted(t["idx"]) == list(range(N_TRAIN))
    for i, text, label, scores in zip(t["idx"], t["sentence"], t["label"], t["scores"]):
        want = example(i)
        assert type(i) is int and type(label) is int and label == want["label"], i  # ClassLabel → its int
        assert text == want["sentence"].decode("utf-8", errors="replace"), i  # str, UTF-8 (très, café)
        assert scores == [float(i), -0.5], i  # numpy arrays → lists
    assert "\ufffd" in t["sentence"][t["idx"].index(BAD_ROW)]  # counted and dropped by cleaning, as for files
    assert any("café" in s for s in t["sentence"])
    # the first rows in the prepared order: max_train_rows, and TFDS split slicing with its own colon
    head = load_table("tfds:tiny_reviews:train", "data.train", limit=5, tfds_data_dir=str(data_dir))
    assert head == {k: v[:5] for k, v in t.items()}
    sliced = load_table("tfds:tiny_reviews:1.0.0:train[5:9]", "data.train", tfds_data_dir=str(data_dir))
    assert sliced == {k: v[5:9] for k, v in t.items()}
    test = load_table("tfds:tiny_reviews:test", "data.test", tfds_data_dir=str(data_dir))
    assert sorted(test["idx"]) == list(range(N_TRAIN, N_TRAIN + N_TEST))
    assert load_table("tfds:tiny_reviews/full:train", "data.train", tfds_data_dir=str(data_dir)) == t  # default
    short = load_table("tfds:tiny_reviews/short:train", "data.train", tfds_data_dir=str(data_dir))
    assert sorted(short["idx"]) == list(range(5))


@pytest.mark.parametrize("spec, data_dir_given, expected", [
    ("tfds:no_such_set:train", True, ["data.train='tfds:no_such_set:train'", "no TFDS data set 'no_such_set'",
                                      "data.tfds_data_dir="]),
    ("tfds:tiny_reviews:validation", True, ["data.train='tfds:tiny_reviews:validation'", "'validation'",
                                            "['train', 'test']"]),
    ("tfds:tiny_reviews", True, ["data.train='tfds:tiny_reviews'", "tfds:NAME[/CONFIG]:SPLIT"]),
    ("tfds::train", True, ["tfds:NAME[/CONFIG]:SPLIT"]),
    ("tfds:imdb_reviews:train", False, ["'imdb_reviews'", "not prepared in data.tfds_data_dir=",
                                        "--file_format=array_record"]),
])
def test_bad_specs_name_what_is_wrong(data_dir, tmp_path, spec, data_dir_given, expected):
    with pytest.raises(DataError) as e:
        load_table(spec, "data.train", tfds_data_dir=str(data_dir if data_dir_given else tmp_path / "empty"))
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_missing_extra_says_what_to_install(monkeypatch, data_dir):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` fails
    with pytest.raises(DataError) as e:
        load_table("tfds:tiny_reviews:train", "data.validation", tfds_data_dir=str(data_dir))
    assert "data.validation='tfds:tiny_reviews:train'" in str(e.value)
    assert "pip install 'jaxft[tfds]'" in str(e.value)


@pytest.fixture(scope="module")
def run_config(data_dir, tmp_path_factory, minilm_dir):
    """A tiny random BERT (dropout on, so the RNG state matters) trained on the TFDS train split."""
    tmp = tmp_path_factory.mktemp("tfds_run")
    model = save_tiny_bert(tmp / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir, random_init=True)
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {model}}}\n"
                   f"data: {{train: 'tfds:tiny_reviews:train', tfds_data_dir: {data_dir}, text_field: sentence, "
                   f"max_length: 16, cache_dir: {tmp / 'cache'}}}\n"
                   "optim: {lr: 1.0e-3, warmup_steps: 2}\n"
                   "train: {batch_size: 8, steps: 12, log_every: 1, log_batches: true}\n")

    def config(name: str, *over: str) -> list[str]:
        return [str(cfg), f"output_dir={tmp / name}", *over]
    return tmp, config


def test_missing_field_names_the_features(run_config, capsys):
    tmp, config = run_config
    assert main(["train", *config("nofield", "data.label_field=sentiment")]) == 2
    err = capsys.readouterr().err
    assert "data.label_field='sentiment'" in err and "tfds:tiny_reviews:train" in err
    assert "idx" in err and "sentence" in err  # the features there are


@pytest.mark.slow
def test_stop_and_resume_on_a_tfds_source_is_bitwise_identical(run_config):
    from safetensors.numpy import load_file

    tmp, config = run_config
    assert main(["train", *config("straight")]) == 0
    assert main(["train", *config("resumed", "train.stop_at_step=6")]) == 0
    assert main(["train", *config("resumed", "train.stop_at_step=6")]) == 0  # the same command continues
    assert "resumed from step 6" in (tmp / "resumed" / "train.log").read_text()
    batches = lambda run: [json.loads(x) for x in (tmp / run / "batches.jsonl").read_text().splitlines()]
    assert len(batches("straight")) == 12 and batches("resumed") == batches("straight")
    # 39 usable rows (the undecodable one dropped), 4 full batches of 8 an epoch: 12 steps cross 2 epochs
    assert "1 undecodable bytes" in (tmp / "straight" / "train.log").read_text()
    assert json.loads((tmp / "straight" / "labels.json").read_text())["values"] == [0, 1]  # ClassLabel ids
    exports = []
    for run in ("straight", "resumed"):
        assert main(["export", str(tmp / run), str(tmp / f"{run}_export")]) == 0
        exports.append(load_file(tmp / f"{run}_export" / "model.safetensors"))
    assert sorted(exports[0]) == sorted(exports[1])
    for k in exports[0]:
        assert np.array_equal(exports[0][k], exports[1][k]), k


@pytest.mark.slow
def test_mock_data_source_trains_and_resumes_exactly(tmp_path, minilm_dir):
    """A catalog data set under `tfds.testing.mock_data` (TFDS's own test double: random records from the
    data set's features, nothing prepared or downloaded) trains end to end, and a run stopped at step 3 and
    resumed equals the run straight to 6."""
    from safetensors.numpy import load_file

    model = save_tiny_bert(tmp_path / "tiny", vocab_size=30522, num_labels=2, tokenizer_from=minilm_dir,
                           random_init=True)
    common = [f"model.name_or_path={model}", "data.train=tfds:imdb_reviews:train", "data.max_length=16",
              f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8", "train.steps=6", "train.log_batches=true"]
    with tfds.testing.mock_data(num_examples=40):
        table = load_table("tfds:imdb_reviews:train", "data.train")
        assert len(table["text"]) == 40 and set(table["label"]) <= {0, 1}
        assert table == load_table("tfds:imdb_reviews:train", "data.train")  # the same records every read
        (tmp_path / "c.yaml").write_text("optim: {lr: 1.0e-3}\n")
        run = lambda name, *over: main(["train", str(tmp_path / "c.yaml"), *common, f"output_dir={tmp_path / name}",
                                        *over])
        assert run("straight") == 0
        assert run("resumed", "train.stop_at_step=3") == 0 and run("resumed") == 0
    batches = lambda name: (tmp_path / name / "batches.jsonl").read_text()
    assert batches("resumed") == batches("straight") and len(batches("straight").splitlines()) == 6
    exports = []
    for name in ("straight", "resumed"):
        assert main(["export", str(tmp_path / name), str(tmp_path / f"{name}_export")]) == 0
        exports.append(load_file(tmp_path / f"{name}_export" / "model.safetensors"))
    for k in exports[0]:
        assert np.array_equal(exports[0][k], exports[1][k]), k
