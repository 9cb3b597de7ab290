"""Tasks and data: task specs, loading (GLUE_DIR, custom files, hub), bad input, tokenising, batching."""

import collections
import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import transformers  # noqa: E402

from eebench.data import (  # noqa: E402
    TaskSpec,
    check_trainable,
    data_fingerprint,
    get_task,
    list_tasks,
    load_task,
    make_loader,
    subset,
    tokenize,
)
from eebench.data import sources as data  # noqa: E402
from eebench.data.metrics import METRICS, compute_metrics  # noqa: E402
from eebench.errors import EebenchError, UnknownNameError  # noqa: E402

GLUE_DIR = os.environ.get("GLUE_DIR")
needs_glue = pytest.mark.skipif(not GLUE_DIR, reason="GLUE_DIR is not set (point it at a GLUE download)")

GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "good",
         "bad", "movie", "is", "very", "not", "and", "it", "was", "fun", "boring", "great", "film", "plot"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Offline, and the split cache in a per-session temporary folder, never the user's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets-cache"))


@pytest.fixture(scope="module")
def tok():
    """A tiny WordPiece tokenizer built offline (pad id 0, gives token_type_ids)."""
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


def files(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def cache_dir() -> Path:
    return Path(os.environ["HF_DATASETS_CACHE"])


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def custom_yaml(tmp_path: Path, body: str, name: str = "mytask.yaml") -> Path:
    return write(tmp_path / name, body)


PAIR_YAML = """\
name: mypair
text_fields: [premise, hypothesis]
label_names: ["yes", "no"]
label_map: {"yes": 0, "no": 1}
metrics: [accuracy, f1]
main_metric: accuracy
eval_split: dev
splits:
  train: {file: data/train.csv}
  dev: {file: data/dev.csv}
"""

PAIR_ROWS = [("the cat sat on the mat", "a cat sat", "yes"), ("the dog", "a very good dog is not a cat", "no"),
             ('it was "great", and fun', "the film was great", "yes"), ("bad", "the movie was boring", "no"),
             ("the plot is very very good and the film is great", "good", "yes")]


def write_pair_task(tmp_path: Path) -> Path:
    for split in ("train", "dev"):
        p = tmp_path / "data" / f"{split}.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "premise", "hypothesis", "answer"])
            for i, r in enumerate(PAIR_ROWS):
                w.writerow([i, *r])
    return custom_yaml(tmp_path, PAIR_YAML.replace("label_map", "format: {columns: {premise: premise, "
                                                   "hypothesis: hypothesis, label: answer}}\nlabel_map"))


def expect_error(fn, *fragments: str, roots: tuple[Path, ...] = ()):
    """``fn`` raises EebenchError with a one-line message holding every fragment, and leaves the
    files under ``roots`` and the data cache as they were."""
    watched = (*roots, cache_dir())
    before = files(*watched)
    with pytest.raises(EebenchError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert files(*watched) == before
    return msg


# ----------------------------------------------------------------------------- task specs


def test_packaged_task_specs():
    assert list_tasks() == GLUE
    expected = {  # main metric, metrics, num_labels, GLUE folder, eval split
        "sst2": ("accuracy", ["accuracy"], 2, "SST-2", "dev"),
        "mrpc": ("f1", ["f1", "accuracy"], 2, "MRPC", "dev"),
        "rte": ("accuracy", ["accuracy"], 2, "RTE", "dev"),
        "cola": ("matthews", ["matthews"], 2, "CoLA", "dev"),
        "qnli": ("accuracy", ["accuracy"], 2, "QNLI", "dev"),
        "qqp": ("f1", ["f1", "accuracy"], 2, "QQP", "dev"),
        "mnli": ("accuracy", ["accuracy"], 3, "MNLI", "dev_matched"),
        "wnli": ("accuracy", ["accuracy"], 2, "WNLI", "dev"),
        "stsb": ("pearson", ["pearson", "spearman"], 1, "STS-B", "dev"),
    }
    for name in GLUE:
        spec = get_task(name)
        main, metrics, num_labels, folder, eval_split = expected[name]
        assert spec.name == name
        assert (spec.main_metric, spec.metrics, spec.num_labels, spec.glue_dir, spec.eval_split) == \
            (main, metrics, num_labels, folder, eval_split)
        assert all(m in METRICS for m in spec.metrics)
        assert spec.hub is not None and (spec.hub.path, spec.hub.name) == ("nyu-mll/glue", name)
        assert spec.is_regression == (name == "stsb")
        assert 1 <= len(spec.text_fields) <= 2
        assert spec.train_split == "train" and spec.eval_split in spec.splits
    assert list(get_task("mnli").splits) == ["train", "dev_matched", "dev_mismatched"]
    assert get_task("mnli").splits["dev_mismatched"].hub_split == "validation_mismatched"
    assert get_task("mnli").text_fields == ["premise", "hypothesis"]
    assert get_task("rte").label_map == {"entailment": 0, "not_entailment": 1}
    assert get_task("qnli").label_names == ["entailment", "not_entailment"]
    assert get_task("mnli").label_names == ["entailment", "neutral", "contradiction"]
    assert get_task("wnli").label_names == ["not_entailment", "entailment"]
    assert get_task("stsb").label_names is None


def test_spec_from_path_and_defaults(tmp_path):
    p = custom_yaml(tmp_path, "text_fields: [text]\nlabel_names: [neg, pos]\nmetrics: [accuracy]\n"
                              "main_metric: accuracy\nsplits: {dev: {file: dev.jsonl}}\neval_split: dev\n"
                              "train_split: null\n")
    spec = get_task(str(p))
    assert spec.name == "mytask" and spec.num_labels == 2 and spec.spec_file == p.resolve()
    assert spec.label_map == {"neg": 0, "pos": 1, "0": 0, "1": 1}
    assert spec.columns("dev") == {"text": "text", "label": "label"}
    assert get_task(spec) is spec
    json.dumps(spec.model_dump(mode="json"))  # goes into the results JSON


def test_check_trainable():
    check_trainable(get_task("sst2"))
    with pytest.raises(EebenchError, match="early exiting for regression .STS-B. is not implemented"):
        check_trainable(get_task("stsb"))


# ----------------------------------------------------------------------------- real GLUE data

DEV_ROWS = {"sst2": 872, "cola": 1043, "mrpc": 408, "rte": 277, "stsb": 1500, "qnli": 5463, "wnli": 71}
TRAIN_ROWS = {"sst2": 67349, "cola": 8551, "mrpc": 3668, "rte": 2490, "stsb": 5749, "wnli": 635}
# (folder, has header, label column index, raw label -> class id), read here independently of the specs
RAW = {
    "sst2": ("SST-2", True, 1, int), "cola": ("CoLA", False, 1, int), "mrpc": ("MRPC", True, 0, int),
    "wnli": ("WNLI", True, 3, int),
    "rte": ("RTE", True, 3, ["entailment", "not_entailment"].index),
    "qnli": ("QNLI", True, 3, ["entailment", "not_entailment"].index),
}


def raw_rows(folder: str, file: str, header: bool) -> list[list[str]]:
    with open(Path(GLUE_DIR) / folder / file, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


@pytest.mark.realdata
@needs_glue
@pytest.mark.parametrize("task", sorted(DEV_ROWS))
@pytest.mark.parametrize("split", ["dev", "train"])
def test_glue_row_counts_and_label_balance(task, split):
    counts = DEV_ROWS if split == "dev" else TRAIN_ROWS
    if task not in counts:
        pytest.skip(f"{task} {split} is not available offline")
    ds = load_task(task, split)
    spec = get_task(task)
    assert len(ds) == counts[task]
    assert ds.column_names == [*spec.text_fields, "label"]
    assert ds.features["label"].dtype == ("float32" if task == "stsb" else "int64")
    if task in RAW:
        folder, header, col, to_id = RAW[task]
        rows = raw_rows(folder, f"{split}.tsv", header)
        assert collections.Counter(ds["label"]) == collections.Counter(to_id(r[col]) for r in rows)
    else:
        rows = raw_rows("STS-B", f"{split}.tsv", True)
        assert sum(ds["label"]) == pytest.approx(sum(float(r[-1]) for r in rows), rel=1e-5)


@pytest.mark.realdata
@needs_glue
def test_glue_quirks_and_data_dir():
    mrpc = load_task("mrpc", "dev")  # BOM before the header; literal quotes
    assert mrpc[0]["sentence2"].startswith('" The foodservice pie business')
    cola = load_task("cola", "dev")  # no header, no trailing newline on the last line
    last = raw_rows("CoLA", "dev.tsv", False)[-1]
    assert cola[-1]["sentence"] == last[3] and cola[-1]["label"] == int(last[1])
    rte = load_task("rte", "dev")
    assert rte[0]["label"] == 1  # not_entailment
    # data_dir: the GLUE root or the task's own folder, either works and beats GLUE_DIR
    assert data_fingerprint(load_task("rte", "dev", data_dir=GLUE_DIR)) == data_fingerprint(rte)
    assert data_fingerprint(load_task("rte", "dev", data_dir=Path(GLUE_DIR) / "RTE")) == data_fingerprint(rte)


@pytest.mark.realdata
@needs_glue
def test_stsb_loads_and_scores(tok):
    spec = get_task("stsb")
    ds = load_task("stsb", "dev")
    labels = torch.tensor(ds["label"])
    assert labels.dtype == torch.float32 and 0 <= labels.min() and labels.max() <= 5
    noisy = labels + torch.linspace(-0.5, 0.5, len(labels))
    scores = compute_metrics(spec.metrics, noisy.numpy(), labels.numpy())
    assert 0.9 < scores["pearson"] < 1 and 0.9 < scores["spearman"] <= 1
    batch = next(iter(make_loader(tokenize(subset(ds, 8, 0), tok, spec), tok, 4)))
    assert batch["labels"].dtype == torch.float32


# ----------------------------------------------------------------------------- custom tasks


def test_custom_csv_task_loads_tokenises_and_batches(tmp_path, tok):
    path = write_pair_task(tmp_path)
    spec = get_task(str(path))
    dev = load_task(str(path), "dev")
    assert dev.column_names == ["premise", "hypothesis", "label"] and len(dev) == len(PAIR_ROWS)
    assert dev["label"] == [0, 1, 0, 1, 0]
    assert dev[2]["premise"] == 'it was "great", and fun'  # CSV quoting honoured
    assert load_task(str(path), "dev") is dev  # cached in process
    t = tokenize(dev, tok, spec, max_seq_length=16)
    assert t.column_names == ["input_ids", "attention_mask", "token_type_ids", "label"]
    assert max(len(x) for x in t["input_ids"]) <= 16
    assert t[0]["input_ids"][:4] == [2, 5, 7, 9]  # [CLS] the cat sat
    batches = list(make_loader(t, tok, batch_size=2))
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    assert torch.cat([b["labels"] for b in batches]).tolist() == dev["label"]


def test_custom_formats_tsv_jsonl_parquet(tmp_path):
    rows = [{"text": "good movie", "y": 1}, {"text": "bad 'film' \"x", "y": 0}, {"text": "fun", "y": 1}]
    write(tmp_path / "a.tsv", "text\ty\n" + "".join(f"{r['text']}\t{r['y']}\n" for r in rows))
    write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    write(tmp_path / "noheader.csv", "".join(f"{r['y']},\"{r['text'].replace(chr(34), chr(34) * 2)}\"\n"
                                             for r in rows))
    body = ("text_fields: [text]\nlabel_names: [neg, pos]\nmetrics: [accuracy]\nmain_metric: accuracy\n"
            "eval_split: tsv\ntrain_split: null\nformat: {columns: {text: text, label: y}}\nsplits:\n"
            "  tsv: {file: a.tsv}\n  jsonl: {file: a.jsonl}\n  parquet: {file: a.parquet}\n"
            f"  abs: {{file: {tmp_path / 'a.jsonl'}}}\n"
            "  csv: {file: noheader.csv, format: {header: false, columns: {text: -1, label: 0}}}\n")
    p = custom_yaml(tmp_path, body)
    fps = set()
    for split in ("tsv", "jsonl", "parquet", "abs", "csv"):
        ds = load_task(str(p), split)
        assert ds["text"] == [r["text"] for r in rows] and ds["label"] == [1, 0, 1], split
        fps.add(data_fingerprint(ds))
    assert len(fps) == 1  # the fingerprint is of the content, not of the file or its format
    other = tmp_path / "other"
    write(other / "a.tsv", "text\ty\nfun\t1\n")
    assert load_task(str(p), "tsv", data_dir=other)["text"] == ["fun"]  # data_dir replaces the YAML's folder
    expect_error(lambda: load_task(str(p), "jsonl", data_dir=other), f"{other}/a.jsonl: file not found",
                 f"resolved against {other}", roots=(tmp_path,))


def test_cached_split_reloads_from_disk(tmp_path, monkeypatch):
    path = write_pair_task(tmp_path)
    ds = load_task(str(path), "train")
    assert ds.cache_files and str(cache_dir()) in ds.cache_files[0]["filename"]
    monkeypatch.setattr(data, "_SPLITS", collections.OrderedDict())
    monkeypatch.setattr(data, "_read_file", lambda *a: pytest.fail("read the file again"))
    again = load_task(str(path), "train")
    assert again is not ds and data_fingerprint(again) == data_fingerprint(ds)


def test_hub_source_through_datasets(monkeypatch):
    fake = datasets.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0], "idx": [0, 1]},
        features=datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                                    "idx": datasets.Value("int32")}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or fake)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    ds = load_task("rte", "dev")
    assert calls == [(("nyu-mll/glue", "rte"), {"split": "validation"})]
    assert ds.column_names == ["sentence1", "sentence2", "label"] and ds["label"] == [1, 0]
    expect_error(lambda: load_task("wnli", "dev"), "label names ['entailment', 'not_entailment'] differ",
                 "['not_entailment', 'entailment']")


# ----------------------------------------------------------------------------- bad input


def test_unknown_task_lists_known():
    expect_error(lambda: get_task("sst3"), "unknown task 'sst3'", "known: cola, mnli, mrpc, qnli, qqp, rte, sst2, "
                 "stsb, wnli", "path of a task .yaml file")
    with pytest.raises(UnknownNameError):
        get_task("sst3")


def test_unknown_split():
    expect_error(lambda: load_task("mnli", "dev"), "no split 'dev'", "train, dev_matched, dev_mismatched")


def test_missing_yaml_file(tmp_path):
    expect_error(lambda: get_task(str(tmp_path / "nope.yaml")), "nope.yaml does not exist", roots=(tmp_path,))


def test_missing_glue_dir_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    expect_error(lambda: load_task("rte", "dev"), f"{tmp_path}/RTE: folder not found",
                 f"{tmp_path}/RTE/{{train.tsv,dev.tsv}}", roots=(tmp_path,))
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "missing"))
    expect_error(lambda: load_task("rte", "dev"), "GLUE_DIR=", "does not exist", roots=(tmp_path,))


def test_missing_glue_file(tmp_path, monkeypatch):
    write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    expect_error(lambda: load_task("rte", "train"), f"{tmp_path}/RTE/train.tsv: file not found",
                 "GLUE layout", roots=(tmp_path,))
    expect_error(lambda: load_task("rte", "train", data_dir=tmp_path / "elsewhere"), "does not exist",
                 roots=(tmp_path,))
    assert len(load_task("rte", "dev")) == 1


def test_missing_column(tmp_path):
    write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence_2\tlabel\n0\ta\tb\tentailment\n")
    expect_error(lambda: load_task("rte", "dev", data_dir=tmp_path),
                 f"{tmp_path}/RTE/dev.tsv: column 'sentence2'", "columns found: index, sentence1, sentence_2, label",
                 roots=(tmp_path,))


def test_missing_column_index_and_ragged_row(tmp_path):
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tok\ngj04\t0\n")
    expect_error(lambda: load_task("cola", "dev", data_dir=tmp_path), "dev.tsv:2: 2 tab-separated fields, expected 4",
                 roots=(tmp_path,))
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\tok\n")
    expect_error(lambda: load_task("cola", "dev", data_dir=tmp_path), "dev.tsv:1: column index 3",
                 "the file has 3 columns", roots=(tmp_path,))


def test_jsonl_missing_key(tmp_path):
    write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n')
    p = custom_yaml(tmp_path, "text_fields: [text]\nlabel_names: [a, b]\nmetrics: [accuracy]\nmain_metric: accuracy\n"
                              "eval_split: dev\ntrain_split: null\nsplits: {dev: {file: d.jsonl}}\n")
    expect_error(lambda: load_task(str(p), "dev"), "d.jsonl:2: column 'text'", "columns found: txt, label",
                 roots=(tmp_path,))


def test_label_outside_label_map(tmp_path):
    write(tmp_path / "RTE" / "dev.tsv",
          "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    expect_error(lambda: load_task("rte", "dev", data_dir=tmp_path / "RTE"), f"{tmp_path}/RTE/dev.tsv:3:",
                 "'maybe'", "accepted: entailment, not_entailment", roots=(tmp_path,))


def test_regression_label_not_a_number_or_out_of_range(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tg\tf\t2012\t0\tnone\tnone\ta\tb\t{}\n"
    write(tmp_path / "STS-B" / "dev.tsv", head + row.format("4.2") + row.format("high"))
    expect_error(lambda: load_task("stsb", "dev", data_dir=tmp_path), "dev.tsv:3: label 'high'", "not a number",
                 roots=(tmp_path,))
    write(tmp_path / "STS-B" / "dev.tsv", head + row.format("4.2") + row.format("7"))
    expect_error(lambda: load_task("stsb", "dev", data_dir=tmp_path), "dev.tsv:3: label 7", "0..5",
                 roots=(tmp_path,))


def test_empty_split(tmp_path):
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\n")
    expect_error(lambda: load_task("sst2", "dev", data_dir=tmp_path), "dev.tsv: split 'dev' of task 'sst2' is empty",
                 roots=(tmp_path,))
    write(tmp_path / "SST-2" / "dev.tsv", "")
    expect_error(lambda: load_task("sst2", "dev", data_dir=tmp_path), "is empty", roots=(tmp_path,))


def test_malformed_yaml(tmp_path):
    p = custom_yaml(tmp_path, "name: x\ntext_fields: [a\nmetrics: [accuracy]\n")
    expect_error(lambda: get_task(str(p)), f"{p}:3: malformed YAML", roots=(tmp_path,))
    p = custom_yaml(tmp_path, "- just\n- a list\n", "list.yaml")
    expect_error(lambda: get_task(str(p)), "must be a YAML mapping", roots=(tmp_path,))


@pytest.mark.parametrize("change, fragment", [
    ("metrics: [accuracy, bleu]", "unknown metric 'bleu'"),
    ("main_metric: f1", "main_metric 'f1' is not one of metrics"),
    ("metrics: [pearson]\nmain_metric: pearson", "metric 'pearson' is for regression tasks"),
    ("eval_split: test", "eval_split 'test' is not one of splits"),
    ("labels: [a, b]", "labels: Extra inputs are not permitted"),
    ("label_names: [yes, no]", "YAML read a label as the boolean True; quote labels"),
    ("format: {columns: {text: text}}", "format.columns must map exactly ['label', 'text']"),
])
def test_invalid_spec(tmp_path, change, fragment):
    base = {"text_fields": "[text]", "label_names": "[a, b]", "metrics": "[accuracy]", "main_metric": "accuracy",
            "eval_split": "dev", "splits": "{dev: {file: d.csv}, train: {file: d.csv}}"}
    for line in change.splitlines():
        k, v = line.split(": ", 1)
        base[k] = v
    p = custom_yaml(tmp_path, "".join(f"{k}: {v}\n" for k, v in base.items()))
    expect_error(lambda: get_task(str(p)), f"{p}: invalid task spec", fragment, roots=(tmp_path,))


def test_hub_requested_while_offline(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    expect_error(lambda: load_task("sst2", "dev"), "needs the Hugging Face hub (nyu-mll/glue (sst2) split "
                 "'validation')", "HF_HUB_OFFLINE is set", "set GLUE_DIR", "GLUE_DIR/SST-2/dev.tsv", "--data-dir")


def test_hub_connection_error(monkeypatch):
    def refuse(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    expect_error(lambda: load_task("cola", "train"), "could not load nyu-mll/glue (cola) split 'train'",
                 "ConnectionError: Couldn't reach", "set GLUE_DIR", "--data-dir")


def test_failed_load_writes_nothing_anywhere(tmp_path, monkeypatch):
    """A label error on the last line of a big-ish file: nothing in the cache, nothing next to it."""
    lines = "".join(f"{i}\tthe cat\tthe dog\tentailment\n" for i in range(3000)) + "3000\ta\tb\tneutral\n"
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n" + lines)
    monkeypatch.chdir(tmp_path)
    expect_error(lambda: load_task("rte", "train", data_dir=tmp_path), "train.tsv:3002: label 'neutral'",
                 roots=(tmp_path,))


# ----------------------------------------------------------------------------- subset, tokenize, loader


def synthetic(n: int = 40, seed: int = 0, pair: bool = False) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    vocab = WORDS[5:]
    text = [" ".join(vocab[j] for j in torch.randint(len(vocab), (int(torch.randint(1, 20, (1,), generator=g)),),
                                                     generator=g).tolist()) for _ in range(n)]
    cols = {"sentence1": text, "sentence2": text[::-1]} if pair else {"sentence": text}
    return datasets.Dataset.from_dict({**cols, "label": [i % 2 for i in range(n)]})


def spec_for(pair: bool = False, regression: bool = False) -> TaskSpec:
    kw = dict(regression=True, metrics=["pearson"], main_metric="pearson") if regression else \
        dict(label_names=["a", "b"], metrics=["accuracy"], main_metric="accuracy")
    return TaskSpec(name="synthetic", text_fields=["sentence1", "sentence2"] if pair else ["sentence"],
                    splits={"dev": {"file": "x.csv"}, "train": {"file": "x.csv"}}, **kw)


def test_subset():
    ds = synthetic(50)
    assert subset(ds, None, 0) is ds and subset(ds, 50, 0) is ds and subset(ds, 99, 0) is ds
    a, b, c = subset(ds, 10, 1), subset(ds, 10, 1), subset(ds, 10, 2)
    assert len(a) == 10 and a["sentence"] == b["sentence"] and a["sentence"] != c["sentence"]
    assert set(a["sentence"]) <= set(subset(ds, 20, 1)["sentence"])  # nested for one seed
    with pytest.raises(EebenchError, match="positive"):
        subset(ds, 0, 0)


def test_tokenize_columns_truncation_and_cache(tok):
    ds, spec = synthetic(30, pair=True), spec_for(pair=True)
    t = tokenize(ds, tok, spec, max_seq_length=12)
    assert t.column_names == ["input_ids", "attention_mask", "token_type_ids", "label"]
    assert max(len(x) for x in t["input_ids"]) == 12 and all(x[-1] == 3 for x in t["input_ids"])
    assert tokenize(ds, tok, spec, max_seq_length=12) is t
    assert tokenize(ds, tok, spec, max_seq_length=16) is not t
    with pytest.raises(EebenchError, match="no column 'sentence'.*columns found: sentence1, sentence2, label"):
        tokenize(ds, tok, spec_for())


def test_loader_dynamic_padding(tok):
    t = tokenize(synthetic(20), tok, spec_for())
    lengths = [len(x) for x in t["input_ids"]]
    for b in make_loader(t, tok, batch_size=6):
        idx = b["index"].tolist()
        assert b["input_ids"].shape == (len(idx), max(lengths[i] for i in idx))
        assert b["attention_mask"].sum(1).tolist() == [lengths[i] for i in idx]
        assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
        assert b["labels"].dtype == torch.long and b["labels"].tolist() == [t[i]["label"] for i in idx]


def test_loader_index_restores_order(tok):
    t = tokenize(synthetic(37), tok, spec_for())
    loader = make_loader(t, tok, batch_size=8, shuffle=True, seed=3, group_by_length=True)
    assert len(loader) == math.ceil(37 / 8)
    restored: list = [None] * 37
    order = []
    for b in loader:
        for row, i in enumerate(b["index"].tolist()):
            order.append(i)
            restored[i] = b["input_ids"][row][b["attention_mask"][row] == 1].tolist()
    assert sorted(order) == list(range(37)) and order != list(range(37))
    assert restored == t["input_ids"]


def pad_tokens(loader) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in loader)


def test_length_grouping_reduces_padding(tok):
    t = tokenize(synthetic(400, seed=1), tok, spec_for())
    plain = pad_tokens(make_loader(t, tok, 16, shuffle=True, seed=0))
    grouped = pad_tokens(make_loader(t, tok, 16, shuffle=True, seed=0, group_by_length=True))
    eval_grouped = pad_tokens(make_loader(t, tok, 16, group_by_length=True))
    assert grouped < plain / 2 and eval_grouped <= grouped
    assert len(make_loader(t, tok, 16, shuffle=True, group_by_length=True)) == 25


def test_loader_deterministic_with_seed(tok):
    t = tokenize(synthetic(100), tok, spec_for())

    def order(loader):
        return [b["index"].tolist() for b in loader]

    for group in (False, True):
        a = make_loader(t, tok, 8, shuffle=True, seed=7, group_by_length=group)
        b = make_loader(t, tok, 8, shuffle=True, seed=7, group_by_length=group)
        epoch1, epoch2 = order(a), order(a)
        assert epoch1 == order(b) and epoch2 == order(b)  # every epoch reproducible
        assert epoch1 != epoch2  # and reshuffled
        assert epoch1 != order(make_loader(t, tok, 8, shuffle=True, seed=8, group_by_length=group))
    assert order(make_loader(t, tok, 8)) == [list(range(i, min(i + 8, 100))) for i in range(0, 100, 8)]


def test_loader_regression_labels_and_errors(tok):
    ds = synthetic(10).cast_column("label", datasets.Value("float32"))
    t = tokenize(ds, tok, spec_for(regression=True))
    assert next(iter(make_loader(t, tok, 4)))["labels"].dtype == torch.float32
    with pytest.raises(EebenchError, match="batch size"):
        make_loader(t, tok, 0)
    with pytest.raises(EebenchError, match="no column 'input_ids'"):
        make_loader(ds, tok, 4)


def test_data_fingerprint_is_content_hash():
    a, b = synthetic(30), synthetic(30)
    assert data_fingerprint(a) == data_fingerprint(b) and len(data_fingerprint(a)) == 64
    assert data_fingerprint(a.select(range(29))) != data_fingerprint(a)
    flipped = a.map(lambda r, i: {"label": 1 - r["label"] if i == 5 else r["label"]}, with_indices=True)
    assert data_fingerprint(flipped) != data_fingerprint(a)
    assert data_fingerprint(a.select_columns(["label", "sentence"])) == data_fingerprint(a)  # column order


def test_data_fingerprint_of_tokenized(tok):
    a, spec = synthetic(30), spec_for()
    t12, t64 = tokenize(a, tok, spec, max_seq_length=12), tokenize(a, tok, spec, max_seq_length=64)
    assert data_fingerprint(t12) != data_fingerprint(t64)
    assert data_fingerprint(subset(t64, 10, 0)) == data_fingerprint(tokenize(subset(a, 10, 0), tok, spec, 64))
