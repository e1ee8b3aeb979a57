"""Tests of minilora/tokenizer.py: the BPE trainer, the committed vocabulary, the GPT-2 loader."""

import json
from collections import Counter

import pytest
import regex
from hypothesis import given, settings, strategies as st
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from minilora.corpus import CORPUS_PATH, RECORDS_PATH, read_jsonl_xz
from minilora.tokenizer import (
    BPE_PATH, EOT, EOT_TEXT, GPT2_PATTERN, GPT2_PATTERN_CLASSIC, VOCAB_SIZE, _gpt2_byte_to_unicode,
    get_tokenizer, gpt2_ranks, load_ranks, save_ranks, train_bpe, train_from_corpus,
)


@pytest.fixture(scope="module")
def corpus_texts():
    return [d["text"] for d in read_jsonl_xz(CORPUS_PATH)]


def reference_bpe(texts, vocab_size):
    """Oracle: recount every pair over the whole text at every step (slow, obviously right)."""
    words = Counter()
    for t in texts:
        words.update(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(GPT2_PATTERN, t))
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        # most frequent; ties -> smallest (left rank, right rank), as train_bpe does
        a, b = min(pairs, key=lambda p: (-pairs[p], ranks[p[0]], ranks[p[1]]))
        ranks.setdefault(a + b, len(ranks))
        merged = Counter()
        for w, c in words.items():
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == (a, b):
                    out.append(a + b)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            merged[tuple(out)] += c
        words = merged
    return ranks


def test_trainer_hand_example():
    # "aaabdaaabac" is one word. Counts: aa 4, ab 2, ... -> merge 256 = "aa" (left to right: aa|a b d aa|a b a c).
    # Then "aa"+"a" = 2 and "a"+"b" = 2 tie; (97, 98) < (256, 97) so 257 = "ab"; then "aa"+"ab" (2) -> 258.
    ranks = train_bpe(["aaabdaaabac"], vocab_size=260)
    merges = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert merges == [(256, b"aa"), (257, b"ab"), (258, b"aaab")]
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_trainer_merges_never_cross_words():
    # " the" is frequent, but no token may span "the" and the space of the next word
    ranks = train_bpe(["the the the the"], vocab_size=270)
    assert b"the" in ranks and b" the" in ranks
    assert not any(t.endswith(b" ") or b"e " in t for t in ranks if len(t) > 1)


def test_trainer_matches_reference(corpus_texts):
    sample = corpus_texts[:40]
    assert train_bpe(sample, 256 + 1 + 300) == reference_bpe(sample, 256 + 1 + 300)


def test_gpt2_pattern_is_tiktokens_and_splits_like_the_classic_form(corpus_texts):
    assert GPT2_PATTERN == r50k_pat_str
    fast, classic = regex.compile(GPT2_PATTERN), regex.compile(GPT2_PATTERN_CLASSIC)
    for text in corpus_texts + ["a  b \n\n c   ", "it's 12.5 µs\t\t!", " "]:
        assert fast.findall(text) == classic.findall(text)


def test_committed_ranks_reproduce_byte_for_byte(tmp_path):
    # retraining on the committed corpus takes a few seconds; it must give the committed file exactly
    save_ranks(train_from_corpus(), tmp_path / "tokenizer.bpe")
    assert (tmp_path / "tokenizer.bpe").read_bytes() == BPE_PATH.read_bytes()


def test_committed_ranks_shape():
    ranks = load_ranks(BPE_PATH)
    assert sorted(ranks.values()) == list(range(VOCAB_SIZE - 1))
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_special_token_id():
    enc = get_tokenizer()
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT == 4095
    assert enc.encode(EOT_TEXT, allowed_special="all") == [EOT]
    assert EOT not in enc.encode_ordinary(EOT_TEXT)  # in plain text it is just characters
    assert enc.decode([EOT]) == EOT_TEXT


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer("minilora")


def test_round_trip_whole_corpus(corpus_texts):
    enc = get_tokenizer()
    for text, ids in zip(corpus_texts, enc.encode_ordinary_batch(corpus_texts)):
        assert enc.decode(ids) == text
        assert max(ids) < EOT


def test_round_trip_records():
    enc = get_tokenizer()
    for r in read_jsonl_xz(RECORDS_PATH):
        for text in (r["signature"], r["doc"], " " + r["params"][-1] if r["params"] else ""):
            assert enc.decode(enc.encode_ordinary(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_compresses_corpus(corpus_texts):
    # a trained vocabulary should beat bytes by a wide margin on the text it was trained on
    enc = get_tokenizer()
    text = "\n".join(corpus_texts[:500])
    assert len(enc.encode_ordinary(text)) < len(text.encode()) / 3


# ---------------------------------------------------------------------------------------------
# GPT-2 format


def write_gpt2_files(ranks, directory):
    """Write ranks as a Hugging Face GPT-2 directory: vocab.json (token -> id) and merges.txt."""
    to_str = _gpt2_byte_to_unicode()
    by_rank = sorted(ranks.items(), key=lambda x: x[1])
    merges = ["#version: 0.2"]
    for token, rank in by_rank[256:]:
        k = next(k for k in range(1, len(token)) if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank)
        merges.append("".join(to_str[c] for c in token[:k]) + " " + "".join(to_str[c] for c in token[k:]))
    vocab = {"".join(to_str[c] for c in t): r for t, r in by_rank}
    vocab[EOT_TEXT] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture()
def gpt2_dir(tmp_path, corpus_texts):
    # a small GPT-2-format vocabulary: GPT-2 numbers the bytes in its own order, merges follow
    trained = train_bpe(corpus_texts[:200], 256 + 1 + 500)
    ranks = {bytes([b]): i for i, b in enumerate(_gpt2_byte_to_unicode())}
    ranks.update({t: r for t, r in trained.items() if r >= 256})
    write_gpt2_files(ranks, tmp_path)
    return tmp_path, ranks


def test_gpt2_loader_matches_tiktoken_conversion(gpt2_dir, monkeypatch):
    directory, ranks = gpt2_dir
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise cache the local files
    oracle = data_gym_to_mergeable_bpe_ranks(str(directory / "merges.txt"), str(directory / "vocab.json"))
    assert gpt2_ranks(directory) == oracle == ranks


def test_gpt2_loader_round_trip(gpt2_dir, corpus_texts):
    directory, ranks = gpt2_dir
    enc = get_tokenizer("gpt2", directory)
    direct = tiktoken.Encoding("direct", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TEXT: len(ranks)})
    assert enc.eot_token == len(ranks) == 756
    for text in corpus_texts[200:260]:
        ids = enc.encode_ordinary(text)
        assert ids == direct.encode_ordinary(text)
        assert enc.decode(ids) == text


def test_gpt2_missing_file_names_it(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        get_tokenizer("gpt2", tmp_path)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        get_tokenizer("gpt2", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="path="):
        get_tokenizer("gpt2")


def test_missing_ranks_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.bpe"):
        get_tokenizer("minilora", tmp_path / "nothing.bpe")
    with pytest.raises(ValueError, match="'minilora' or 'gpt2'"):
        get_tokenizer("llama")
