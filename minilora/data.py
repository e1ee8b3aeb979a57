"""The embedded data: pretraining text, batches of it, and two fine-tuning tasks.

    python -m minilora.data     # prints the sizes quoted in data/README.md

Everything comes from two files built by `python -m minilora.corpus` from CPython's standard library
(© Python Software Foundation, PSF License; see data/README.md):

* `load_documents(split)` / `corpus_tokens(split)`: docstrings and reference pages for pretraining,
  split train / val by document.
* `load_task(name)`: fine-tuning examples made from function records, split train / val / test by
  function name. No val/test answer of the "docstring" task occurs in the pretraining text.

Tasks (prompt -> answer, the answer ends with EOT; loss and metrics look at the answer only):

* "docstring": `# {owner}\\n{signature}:\\n    \"\"\"` -> `{first line of the docstring}`, where
  owner is the module, or module.Class for a method.
* "lastparam": `{signature}\\nlast parameter:` -> ` {name}`, for signatures with >= 2 parameters
  besides self/cls. The name is written bare: `*args` -> ` args`, `**kwargs` -> ` kwargs`.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch

from minilora.corpus import CORPUS_PATH, DATA_DIR, RECORDS_PATH, read_jsonl_xz
from minilora.tokenizer import get_tokenizer

SPLITS = ("train", "val", "test")
IGNORE_INDEX = -100  # target value F.cross_entropy skips: prompt and padding positions

__all__ = ["DATA_DIR", "load_records", "load_documents", "corpus_tokens", "get_batch", "Example",
           "Task", "TASKS", "load_task", "collate", "describe"]


# ---------------------------------------------------------------------------------------------
# pretraining text


@functools.lru_cache(maxsize=None)
def _read(path) -> tuple[dict, ...]:
    return tuple(read_jsonl_xz(path))


def load_records() -> list[dict]:
    """Function records: module, qualname, signature, params, doc (docstring first line), split."""
    return [dict(r) for r in _read(RECORDS_PATH)]


def load_documents(split: str) -> list[str]:
    """Texts of the pretraining documents of `split` ("train" or "val"), in corpus order."""
    if split not in ("train", "val"):
        raise ValueError(f"pretraining split {split!r} does not exist; use 'train' or 'val'")
    return [d["text"] for d in _read(CORPUS_PATH) if d["split"] == split]


_TOKENS: dict[tuple, torch.Tensor] = {}


def corpus_tokens(split: str, enc=None) -> torch.Tensor:
    """All documents of `split` as one 1-D int64 tensor, each followed by EOT: `doc EOT doc EOT ...`.

    Cached per (split, encoding); treat the tensor as read-only.
    """
    enc = enc or get_tokenizer()
    key = (split, enc)  # an Encoding hashes by identity; get_tokenizer returns one object per vocabulary
    if key not in _TOKENS:
        ids = []
        for doc in enc.encode_ordinary_batch(load_documents(split)):  # a literal "<|endoftext|>" stays text
            ids += doc
            ids.append(enc.eot_token)
        _TOKENS[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKENS[key]


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """`batch_size` random windows of the token stream: x (B, T) and y (B, T), y[:, t] = x[:, t + 1].

    Windows start uniformly in [0, len - T - 1]; the draw uses `generator` only, so a seeded
    generator gives the same batches on every run.
    """
    n = tokens.numel() - block_size  # number of valid starts (y needs one token past the window)
    if n < 1:
        raise ValueError(f"block_size {block_size} needs more than {block_size} tokens, got {tokens.numel()}; lower block_size")
    start = torch.randint(n, (batch_size,), generator=generator)  # (B,)
    pos = start[:, None] + torch.arange(block_size)  # (B, T)
    return tokens[pos], tokens[pos + 1]


# ---------------------------------------------------------------------------------------------
# fine-tuning tasks


@dataclass
class Example:
    prompt: list[int]  # token ids shown to the model
    answer: list[int]  # token ids it must produce; ends with EOT


@dataclass
class Task:
    name: str
    description: str
    metric: str
    train: list[Example]
    val: list[Example]
    test: list[Example]


TASKS = {
    "docstring": "write the first line of a stdlib function's docstring from its signature",
    "lastparam": "name the last parameter of a stdlib function signature",
}
METRICS = {
    "docstring": "answer loss (mean nats per answer token) and greedy exact match",
    "lastparam": "greedy exact match",
}


def docstring_text(rec: dict) -> tuple[str, str]:
    """(prompt, answer) text of the docstring task for one record."""
    owner = rec["module"] + "".join("." + p for p in rec["qualname"].split(".")[:-1])
    return f'# {owner}\n{rec["signature"]}:\n    """', rec["doc"]


def lastparam_text(rec: dict) -> tuple[str, str] | None:
    """(prompt, answer) text of the lastparam task, or None when < 2 parameters besides self/cls."""
    params = rec["params"]
    if params and params[0] in ("self", "cls"):
        params = params[1:]
    if len(params) < 2:
        return None
    return f"{rec['signature']}\nlast parameter:", " " + params[-1]


def task_texts(name: str) -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) texts of task `name` per split, before tokenization.

    Each prompt appears once over all splits: repeats are dropped, and a val/test prompt that is
    also a train prompt goes (train wins, then val), so no eval example is a copy of a train one.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    make = docstring_text if name == "docstring" else lastparam_text
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    records = load_records()
    for split in SPLITS:
        for rec in records:
            pair = make(rec) if rec["split"] == split else None
            if pair and pair[0] not in seen:
                seen.add(pair[0])
                out[split].append(pair)
    return out


def load_task(name: str, enc=None, max_len: int = 96) -> Task:
    """Task `name` tokenized with `enc` (default: minilora's); examples over `max_len` tokens
    (prompt + answer, EOT included) are dropped. 96 leaves room in the base's 128 positions for the
    vectors that prompt and prefix methods add, so every method sees the same examples."""
    enc = enc or get_tokenizer()
    splits = {}
    for split, pairs in task_texts(name).items():
        examples = []
        for prompt, answer in pairs:
            ex = Example(enc.encode_ordinary(prompt), enc.encode_ordinary(answer) + [enc.eot_token])
            if len(ex.prompt) + len(ex.answer) <= max_len:
                examples.append(ex)
        splits[split] = examples
    return Task(name, TASKS[name], METRICS[name], **splits)


def collate(examples: list[Example], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch of prompt+answer sequences: idx (B, T) and targets (B, T).

    The model reads s = prompt + answer without its last token (EOT is predicted, never read), so an
    example needs len(prompt) + len(answer) - 1 <= block_size. targets[b, t] = s[t + 1] where s[t + 1]
    is an answer token and IGNORE_INDEX (-100) on prompt and padding positions, so the loss is the
    answer's alone. T is the longest example's length.
    """
    if not examples:
        raise ValueError("collate got no examples; pass a non-empty list")
    for i, ex in enumerate(examples):
        if not ex.prompt or not ex.answer:
            raise ValueError(f"example {i} has an empty prompt or answer; every example needs both")
        if len(ex.prompt) + len(ex.answer) - 1 > block_size:
            raise ValueError(
                f"example {i} needs {len(ex.prompt) + len(ex.answer) - 1} positions (prompt {len(ex.prompt)} + "
                f"answer {len(ex.answer)} - 1) > block_size {block_size}; raise block_size or load_task(max_len=...)"
            )
    T = max(len(ex.prompt) + len(ex.answer) for ex in examples) - 1
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, ex in enumerate(examples):
        s, P = ex.prompt + ex.answer, len(ex.prompt)
        idx[b, : len(s) - 1] = torch.tensor(s[:-1])
        # position t predicts s[t + 1]; the answer s[P:] is predicted at t = P - 1 .. len(s) - 2
        targets[b, P - 1 : len(s) - 1] = torch.tensor(s[P:])
    return idx, targets


# ---------------------------------------------------------------------------------------------


def describe(enc=None) -> str:
    """The data's sizes as a Markdown-friendly text block (what data/README.md quotes)."""
    enc = enc or get_tokenizer()
    lines = []
    docs = _read(CORPUS_PATH)
    kinds = Counter(d["kind"] for d in docs)
    lines.append(f"documents: {len(docs)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    for split in ("train", "val"):
        texts = load_documents(split)
        chars = sum(len(t) for t in texts)
        lines.append(f"pretraining {split}: {len(texts)} docs, {chars:,} chars, "
                     f"{corpus_tokens(split, enc).numel():,} tokens ({enc.name}, EOT after each doc)")
    records = load_records()
    per = Counter(r["split"] for r in records)
    lines.append(f"records: {len(records)} (" + ", ".join(f"{s} {per[s]}" for s in SPLITS) + ")")
    for name in TASKS:
        task = load_task(name, enc)
        sizes = ", ".join(f"{s} {len(getattr(task, s))}" for s in SPLITS)
        mean_p = sum(len(e.prompt) for e in task.train) / len(task.train)
        mean_a = sum(len(e.answer) for e in task.train) / len(task.train)
        lines.append(f"task {name}: {sizes}; train mean tokens: prompt {mean_p:.1f}, answer {mean_a:.1f} (EOT incl.)")
        if name == "lastparam":
            answers = Counter(enc.decode(e.answer[:-1]) for e in task.test)
            top, n = answers.most_common(1)[0]
            lines.append(f"task lastparam: most common test answer {top!r} in {n}/{len(task.test)} "
                         f"({100 * n / len(task.test):.1f} %, the constant-guess baseline)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
