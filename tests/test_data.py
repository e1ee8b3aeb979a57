"""Tests of minilora/data.py and the committed corpus (minilora/corpus.py)."""

import platform
from collections import Counter

import pytest
import torch

from minilora import corpus
from minilora.data import (
    IGNORE_INDEX, TASKS, Example, collate, corpus_tokens, get_batch, load_documents, load_records,
    lastparam_text, load_task, task_texts,
)
from minilora.tokenizer import EOT, get_tokenizer


@pytest.fixture(scope="module")
def records():
    return load_records()


@pytest.fixture(scope="module")
def tasks():
    return {name: load_task(name) for name in TASKS}


# ---------------------------------------------------------------------------------------------
# splits and leaks


def test_record_splits_are_the_name_hash(records):
    assert all(r["split"] == corpus.record_split(r["module"], r["qualname"]) for r in records)
    names = [f"{r['module']}.{r['qualname']}" for r in records]
    assert len(set(names)) == len(names)  # one record per function, so one split per function


def test_record_splits_are_roughly_80_10_10(records):
    share = {s: n / len(records) for s, n in Counter(r["split"] for r in records).items()}
    assert share["train"] == pytest.approx(0.8, abs=0.03)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    assert share["test"] == pytest.approx(0.1, abs=0.02)


def test_split_hash_is_fixed():
    # pinned: first 8 bytes of sha256(name), big-endian, mod 100 (computed with hashlib, any Python)
    assert [corpus._bucket(k) for k in ("json.dumps", "os.path.join", "function:json.dumps")] == [14, 79, 10]
    assert corpus.record_split("json", "dumps") == "train"


def test_answers_are_unique_across_records(records):
    # records are deduplicated by docstring first line, so no answer is both in train and in test
    assert len({r["doc"] for r in records}) == len(records)


def test_document_splits(records):
    docs = corpus.read_jsonl_xz(corpus.CORPUS_PATH)
    assert all(d["split"] == corpus.document_split(d["id"]) for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert 0.02 < sum(d["split"] == "val" for d in docs) / len(docs) < 0.08
    assert len(load_documents("train")) + len(load_documents("val")) == len(docs)


def test_heldout_docstrings_absent_from_pretraining_text(records):
    text = "\x00".join(load_documents("train") + load_documents("val"))
    held_out = [r for r in records if r["split"] != "train"]
    assert len(held_out) > 500
    leaks = [r["doc"] for r in held_out if r["doc"] in text]
    assert leaks == []
    ids = {d["id"] for d in corpus.read_jsonl_xz(corpus.CORPUS_PATH)}
    assert not any(f"function:{r['module']}.{r['qualname']}" in ids for r in held_out)


def test_train_docstrings_present_in_pretraining_text(records):
    # the exclusion is targeted: most train answers are still there for the base model to read
    text = "\x00".join(load_documents("train") + load_documents("val"))
    train = [r for r in records if r["split"] == "train"]
    assert sum(r["doc"] in text for r in train) / len(train) > 0.8


@pytest.mark.skipif(platform.python_version() != corpus.BUILT_WITH_PYTHON,
                    reason=f"the committed corpus was built from Python {corpus.BUILT_WITH_PYTHON}'s stdlib")
def test_corpus_rebuild_matches_committed():
    records, docs, _ = corpus.build()
    assert records == corpus.read_jsonl_xz(corpus.RECORDS_PATH)
    assert docs == corpus.read_jsonl_xz(corpus.CORPUS_PATH)


# ---------------------------------------------------------------------------------------------
# pretraining batches


def test_corpus_tokens_join_documents_with_eot():
    tokens = corpus_tokens("val")
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert (tokens == EOT).sum().item() == len(load_documents("val")) and tokens[-1].item() == EOT
    assert corpus_tokens("val") is tokens  # cached
    with pytest.raises(ValueError, match="'train' or 'val'"):
        load_documents("test")


def test_get_batch_shapes_shift_and_determinism():
    tokens = torch.arange(1000)
    x, y = get_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # on arange, "y is x shifted by one" is y = x + 1
    x2, y2 = get_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = get_batch(tokens, 4, 16, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_get_batch_reaches_both_ends_and_rejects_short_streams():
    tokens = torch.arange(10)
    x, y = get_batch(tokens, 2000, 4, torch.Generator().manual_seed(0))
    assert x.min().item() == 0 and y.max().item() == 9  # first and last token are both drawn
    with pytest.raises(ValueError, match="lower block_size"):
        get_batch(tokens, 1, 10, torch.Generator())


# ---------------------------------------------------------------------------------------------
# tasks


def test_collate_masks_exactly_prompt_and_padding():
    a = Example(prompt=[1, 2, 3], answer=[4, EOT])  # reads 1 2 3 4, predicts 4 after 3, EOT after 4
    b = Example(prompt=[5], answer=[6, 7, EOT])  # reads 5 6 7, then padding
    idx, targets = collate([a, b], block_size=8, pad_id=0)
    assert idx.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 4, EOT], [6, 7, EOT, IGNORE_INDEX]]


def test_collate_too_long_example():
    ex = Example(prompt=list(range(6)), answer=[1, 2, EOT])  # needs 6 + 3 - 1 = 8 positions
    assert collate([ex], block_size=8, pad_id=0)[0].shape == (1, 8)
    with pytest.raises(ValueError, match="block_size 7"):
        collate([ex], block_size=7, pad_id=0)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="docstring, lastparam"):
        load_task("summarize")


def test_tasks_nonempty_in_every_split(tasks):
    for task in tasks.values():
        for split in ("train", "val", "test"):
            examples = getattr(task, split)
            assert len(examples) > 100
            assert all(ex.answer[-1] == EOT and EOT not in ex.prompt for ex in examples)
            assert all(len(ex.prompt) + len(ex.answer) <= 128 for ex in examples)


def test_no_prompt_in_two_splits():
    for name in TASKS:
        texts = task_texts(name)
        prompts = [p for split in texts.values() for p, _ in split]
        assert len(set(prompts)) == len(prompts)


def test_docstring_task_format(records):
    enc = get_tokenizer()
    task = load_task("docstring")
    prompt, answer = enc.decode(task.train[0].prompt), enc.decode(task.train[0].answer[:-1])
    rec = next(r for r in records if r["split"] == "train" and r["doc"] == answer)
    assert prompt == f'# {rec["module"]}{"".join("." + p for p in rec["qualname"].split(".")[:-1])}\n{rec["signature"]}:\n    """'


def test_lastparam_answers():
    assert lastparam_text({"signature": "def f(self, a)", "params": ["self", "a"]}) is None  # self does not count
    assert lastparam_text({"signature": "def f(cls, a, b)", "params": ["cls", "a", "b"]}) == ("def f(cls, a, b)\nlast parameter:", " b")
    assert lastparam_text({"signature": "def f(a, *args, **kw)", "params": ["a", "args", "kw"]})[1] == " kw"
    answers = {p.split("\n")[0]: a for p, a in task_texts("lastparam")["train"]}
    assert answers["def get(self, key, default=None)"] == " default"
    starred = [a for sig, a in answers.items() if sig.endswith("**kwargs)")]
    assert starred and set(starred) == {" kwargs"}  # **kwargs is answered bare


def test_max_len_drops_long_examples():
    short = load_task("docstring", max_len=24)
    assert 0 < len(short.train) < len(load_task("docstring").train)
    assert all(len(ex.prompt) + len(ex.answer) <= 24 for ex in short.train)
