"""Byte-level BPE: a small trainer, and tiktoken encodings for minilora's vocabulary and GPT-2's.

    python -m minilora.tokenizer    # retrains data/tokenizer.bpe from the corpus's train documents

BPE (Sennrich et al. 2016, arXiv:1508.07909) in GPT-2's byte-level form (Radford et al. 2019): the
vocabulary starts as the 256 single bytes; training repeatedly finds the most frequent adjacent pair
of tokens in the training text and adds their concatenation as a new token. Text is first split
into "words" with GPT-2's regex, and merges never cross a word boundary, so training only needs the
count of each distinct word. tiktoken does the encoding: given the ranks (token bytes -> merge
order), it merges the lowest-ranked adjacent pair of each word until none is in the vocabulary.

Vocabulary of the "minilora" encoding: ids 0..255 the bytes, 256..4094 the 3839 merges in training
order, 4095 the special token `<|endoftext|>` (`EOT`).
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
from collections import Counter
from pathlib import Path

import regex  # installed with tiktoken (a declared dependency of it): \p{L} / \p{N} classes
import tiktoken

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BPE_PATH = DATA_DIR / "tokenizer.bpe"

# GPT-2's pre-tokenizer, in GPT-2's own form (CLASSIC): contractions, letters / digits / punctuation
# with an optional leading space, whitespace (a run of spaces gives its last one to the next word).
# GPT2_PATTERN is tiktoken's `gpt2` pat_str: the same matches with possessive quantifiers (faster).
# Tests check that it equals tiktoken's and splits the corpus exactly as the classic form does.
GPT2_PATTERN_CLASSIC = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 4096  # 256 bytes + 3839 merges + EOT
EOT = VOCAB_SIZE - 1  # id of <|endoftext|> in the minilora encoding; any encoding: `enc.eot_token`


# ---------------------------------------------------------------------------------------------
# training


def train_bpe(texts: list[str], vocab_size: int, pattern: str = GPT2_PATTERN) -> dict[bytes, int]:
    """Byte-level BPE ranks for `texts`: {token bytes: rank}, ranks 0..255 the bytes, then merges.

    `vocab_size` counts one special token that is not returned, so `vocab_size - 257` merges are made.
    Ties between pairs of equal count go to the smallest (left id, right id): deterministic, and
    byte order for single bytes. Counts are updated incrementally: a merge only revisits the words
    that contain the merged pair (found through `where`), so each step costs the size of its words.
    """
    n_merges = vocab_size - 257
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below 257 (256 bytes + <|endoftext|>); use >= 257")

    # 1. distinct words and their counts; a word is a list of token ids, starting as its bytes
    counts = Counter()
    pat = regex.compile(pattern)
    for text in texts:
        counts.update(pat.findall(text))
    words = [list(w.encode("utf-8")) for w in sorted(counts)]  # sorted: deterministic word indices
    freq = [counts[w] for w in sorted(counts)]

    # 2. pair statistics: pairs[(a, b)] = occurrences weighted by word count; where[(a, b)] = word ids
    pairs: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where.setdefault(p, set()).add(i)
    heap = [(-c, p) for p, c in pairs.items()]  # max count first, then smallest pair
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ranks = {t: i for i, t in enumerate(vocab)}  # bytes -> id
    while len(vocab) < 256 + n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:
            continue  # stale heap entry: the count changed since it was pushed
        a, b = pair
        merged = vocab[a] + vocab[b]
        # two different pairs can spell the same bytes (" t"+"he" and " th"+"e"); reuse that token
        new = ranks.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            ranks[merged] = new

        changed = set()
        for i in where.pop(pair):
            w = words[i]
            # replace each non-overlapping (a, b), scanning left to right ("aaa" -> "aa" "a")
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):
                continue  # index entry outlived the pair in this word
            for p in zip(w, w[1:]):  # remove the word's old pairs ...
                pairs[p] -= freq[i]
                changed.add(p)
            for p in zip(out, out[1:]):  # ... and add its new ones
                pairs[p] += freq[i]
                changed.add(p)
                if p != pair:
                    where.setdefault(p, set()).add(i)
            words[i] = out
        pairs.pop(pair, None)
        for p in changed:
            c = pairs.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pairs.pop(p, None)
    return ranks


def save_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """tiktoken's .bpe format: `base64(token) rank` per line, by rank; temp file then rename."""
    path = Path(path)
    lines = [base64.b64encode(t).decode("ascii") + f" {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    tmp.replace(path)


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a .bpe file. (Not tiktoken.load: it copies local files into a cache keyed by path and
    would keep serving the old copy after the file is retrained.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer ranks {path} are missing; rebuild them with `python -m minilora.tokenizer`")
    ranks = {}
    for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected `base64 rank`, got {line!r}; retrain with `python -m minilora.tokenizer`") from e
    return ranks


# ---------------------------------------------------------------------------------------------
# encodings


def get_tokenizer(name: str = "minilora", path: str | Path | None = None) -> tiktoken.Encoding:
    """A tiktoken encoding, built once per (name, path) and then shared.

    "minilora": the committed 4096-token vocabulary (`path` overrides data/tokenizer.bpe).
    "gpt2": GPT-2's 50257-token vocabulary, from a local Hugging Face GPT-2 directory `path`
    holding `vocab.json` and `merges.txt`. Nothing is ever downloaded.
    """
    if name == "minilora" and path is None:
        path = BPE_PATH
    return _get_tokenizer(name, None if path is None else Path(path).resolve())


@functools.lru_cache(maxsize=None)
def _get_tokenizer(name: str, path: Path | None) -> tiktoken.Encoding:
    if name == "minilora":
        ranks = load_ranks(path)
        return tiktoken.Encoding(
            name="minilora",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: len(ranks)},
        )
    if name == "gpt2":
        if path is None:
            raise ValueError(
                "get_tokenizer('gpt2') needs path= a local directory with GPT-2's vocab.json and merges.txt "
                "(copy them from a Hugging Face GPT-2 download); minilora never downloads"
            )
        ranks = gpt2_ranks(Path(path))
        return tiktoken.Encoding(
            name="gpt2-local",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: len(ranks)},  # 50256 for GPT-2
        )
    raise ValueError(f"unknown tokenizer {name!r}; choose 'minilora' or 'gpt2'")


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, used in its vocab.json and merges.txt files.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) map in byte
    order to chr(256), chr(257), ... so that every token is a printable, space-free string.
    """
    keep = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def gpt2_ranks(directory: Path) -> dict[bytes, int]:
    """GPT-2's ranks from `merges.txt` (the merge order) checked against `vocab.json` (the ids).

    The same conversion as `tiktoken.load.data_gym_to_mergeable_bpe_ranks`, on local files only:
    rank of a byte = its position in GPT-2's byte order, rank of merge k = 256 + k.
    """
    files = {}
    for fname in ("merges.txt", "vocab.json"):
        f = Path(directory) / fname
        if not f.exists():
            raise FileNotFoundError(
                f"{f} not found: get_tokenizer('gpt2', path) needs a local Hugging Face GPT-2 directory "
                f"with vocab.json and merges.txt (copy them from a GPT-2 download)"
            )
        files[fname] = f.read_text(encoding="utf-8")
    decode = {c: b for b, c in _gpt2_byte_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        return bytes(decode[c] for c in s)

    ranks = {bytes([b]): i for i, b in enumerate(_gpt2_byte_to_unicode())}  # dict order = GPT-2 byte order
    for line in files["merges.txt"].splitlines():
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        ranks[to_bytes(left) + to_bytes(right)] = len(ranks)

    vocab = {to_bytes(k): v for k, v in json.loads(files["vocab.json"]).items() if k != EOT_TEXT}
    if vocab != ranks:
        raise ValueError(
            f"{directory}: vocab.json and merges.txt disagree (ranks must equal ids in merge order); "
            f"use the two files of one GPT-2 download"
        )
    return ranks


# ---------------------------------------------------------------------------------------------


def train_from_corpus() -> dict[bytes, int]:
    """Ranks trained on the train split of data/corpus.jsonl.xz (what data/tokenizer.bpe holds)."""
    from minilora.corpus import CORPUS_PATH, read_jsonl_xz

    texts = [d["text"] for d in read_jsonl_xz(CORPUS_PATH) if d["split"] == "train"]
    return train_bpe(texts, VOCAB_SIZE)


def main() -> None:
    import time

    t0 = time.perf_counter()
    ranks = train_from_corpus()
    save_ranks(ranks, BPE_PATH)
    _get_tokenizer.cache_clear()
    print(f"wrote {BPE_PATH} ({len(ranks)} ranks + EOT) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
