"""Build minilora's embedded corpus from the running interpreter's standard library.

    python -m minilora.corpus      # writes data/records.jsonl.xz and data/corpus.jsonl.xz

The source files are parsed with `ast`, never imported, so the build runs no stdlib code. Two outputs:

* records: one per public function or method with a docstring, for the fine-tuning tasks in
  `minilora/data.py`: `{"module", "qualname", "signature", "params", "doc", "split"}`.
* documents: the pretraining text, one per module / class / function docstring plus the language
  reference pages of `pydoc_data.topics`: `{"id", "kind", "split", "text"}`.

Splits are fixed by hashing names (never by position), so adding a file upstream moves no record:
a record goes to train / val / test by `sha256(module.qualname) % 100` (< 80, < 90, rest) and a
document to train / val by `sha256(id) % 100` (< 95, rest). The pretraining text holds no document
that contains the docstring first line of a val or test record: those are the answers of the
docstring task, and a base model that has read them would be tested on memory, not on fine-tuning.

The text is © Python Software Foundation, under the PSF License Agreement (see data/README.md).
"""

from __future__ import annotations

import ast
import bisect
import copy
import hashlib
import json
import lzma
import os
import sys
import sysconfig
from pathlib import Path

from minilora.settings import DATA_DIR  # repo_root / "data"

RECORDS_PATH = DATA_DIR / "records.jsonl.xz"
CORPUS_PATH = DATA_DIR / "corpus.jsonl.xz"

# directories that hold tests, demos, tools or third-party code, not the library's own API
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo"}
DOC_LINE_MIN, DOC_LINE_MAX = 8, 100  # length bounds (chars) of a record's docstring first line
MAX_CORPUS_CHARS = 8_000_000  # cap on the documents' total text (chars); see `cap_documents`
BUILT_WITH_PYTHON = "3.11.7"  # the interpreter whose stdlib made the committed data/ files
XZ_PRESET = 6  # fixed lzma preset; the .xz container stores no timestamp or file name


# ---------------------------------------------------------------------------------------------
# splits


def _bucket(key: str) -> int:
    """A stable number in [0, 100) for `key`: the first 8 bytes of sha256, as an int, mod 100."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100


def record_split(module: str, qualname: str) -> str:
    """train (80 %) / val (10 %) / test (10 %) of a function record, from its dotted name."""
    b = _bucket(f"{module}.{qualname}")
    return "train" if b < 80 else "val" if b < 90 else "test"


def document_split(doc_id: str) -> str:
    """train (95 %) / val (5 %) of a pretraining document, from its id."""
    return "train" if _bucket(doc_id) < 95 else "val"


# ---------------------------------------------------------------------------------------------
# reading the stdlib


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every importable .py file under root, sorted by path."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if SKIP_DIRS.intersection(parts[:-1]) or parts[-1] in {"test", "tests"}:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        # `config-3.11-x86_64-linux-gnu/python-config.py` and the like are not importable modules
        if parts and all(p.isidentifier() for p in parts):
            out.append((".".join(parts), path))
    return out


def _statements(body: list[ast.stmt]):
    """Statements of a module or class body, looking inside `if` / `try` blocks (platform variants)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _statements(block)
        else:
            yield node


def _is_public(name: str) -> bool:
    """Public API names: no leading underscore, except dunders such as `__init__`."""
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """`def name(a, /, b=1, *args, c, **kwargs)`: the header rebuilt by ast.unparse, no annotations."""
    args = copy.deepcopy(fn.args)
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    prefix = "async def" if isinstance(fn, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {fn.name}({ast.unparse(args)})"


def param_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameter names in the order the signature writes them (`*args` as `args`, `**kw` as `kw`)."""
    a = fn.args
    names = [p.arg for p in [*a.posonlyargs, *a.args]]
    names += [a.vararg.arg] if a.vararg else []
    names += [p.arg for p in a.kwonlyargs]
    names += [a.kwarg.arg] if a.kwarg else []
    return names


def first_line(doc: str) -> str:
    """First non-empty line of a cleaned docstring, stripped."""
    return next((line.strip() for line in doc.splitlines() if line.strip()), "")


def parse_module(module: str, tree: ast.Module):
    """Yield ("doc", id, kind, text) and ("record", dict) items of one parsed module.

    Functions are taken at module level and in classes (nested classes too), not inside function
    bodies: nested functions are implementation details.
    """
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "doc", f"module:{module}", "module", doc

    def visit(body, prefix: str, public: bool):
        for node in _statements(body):
            if isinstance(node, ast.ClassDef):
                qualname = prefix + node.name
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield "doc", f"class:{module}.{qualname}", "class", doc
                yield from visit(node.body, qualname + ".", public and _is_public(node.name))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + node.name
                doc = ast.get_docstring(node, clean=True)
                if not doc:
                    continue
                yield "doc", f"function:{module}.{qualname}", "function", doc
                line = first_line(doc)
                if public and _is_public(node.name) and DOC_LINE_MIN <= len(line) <= DOC_LINE_MAX:
                    yield "record", {
                        "module": module,
                        "qualname": qualname,
                        "signature": signature(node),
                        "params": param_names(node),
                        "doc": line,
                        "split": record_split(module, qualname),
                    }

    yield from visit(tree.body, "", True)


# ---------------------------------------------------------------------------------------------
# building


def collect(stdlib: Path) -> tuple[list[dict], list[dict]]:
    """Parse the stdlib under `stdlib`; return (records, documents), before leak filtering."""
    records: dict[str, dict] = {}
    docs: dict[str, dict] = {}
    for module, path in stdlib_files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately invalid or in another Python's syntax
        for item in parse_module(module, tree):
            if item[0] == "record":
                rec = item[1]
                records.setdefault(f"{rec['module']}.{rec['qualname']}", rec)  # first definition wins
            else:
                _, doc_id, kind, text = item
                docs.setdefault(doc_id, {"id": doc_id, "kind": kind, "text": text})

    from pydoc_data.topics import topics  # the language reference, as shipped for help()

    for name in sorted(topics):
        docs.setdefault(f"topic:{name}", {"id": f"topic:{name}", "kind": "topic", "text": topics[name].strip()})
    return [records[k] for k in sorted(records)], list(docs.values())


def dedupe_records(records: list[dict]) -> list[dict]:
    """Keep one record per docstring first line: the first in sorted `module.qualname` order.

    Platform twins such as `posixpath.join` / `ntpath.join` share their docstring; keeping both
    would put the same answer in train and in test.
    """
    seen, out = set(), []
    for rec in records:
        if rec["doc"] not in seen:
            seen.add(rec["doc"])
            out.append(rec)
    return out


def drop_leaks(docs: list[dict], records: list[dict]) -> tuple[list[dict], int]:
    """Drop every document whose text contains the docstring first line of a val/test record.

    This removes the held-out functions' own docstrings and any other copy of their answers
    (a class docstring quoting a method, a platform twin). Returns (kept documents, number dropped).
    """
    held_out = sorted({r["doc"] for r in records if r["split"] != "train"})
    sep = "\x00"  # never inside a docstring, so a match cannot span two documents
    joined = sep.join(d["text"] for d in docs)
    starts, pos = [], 0
    for d in docs:
        starts.append(pos)
        pos += len(d["text"]) + 1
    bad = set()
    for line in held_out:
        i = joined.find(line)
        while i != -1:
            k = bisect.bisect_right(starts, i) - 1
            bad.add(k)
            i = joined.find(line, starts[k] + len(docs[k]["text"]) + 1)  # next document
    return [d for k, d in enumerate(docs) if k not in bad], len(bad)


def cap_documents(docs: list[dict], max_chars: int = MAX_CORPUS_CHARS) -> list[dict]:
    """Keep documents in order of their hash bucket then id until `max_chars` of text.

    Deterministic and unbiased across modules: which documents survive depends only on their ids.
    """
    order = sorted(docs, key=lambda d: (hashlib.sha256(d["id"].encode()).hexdigest(), d["id"]))
    kept, total = set(), 0
    for d in order:
        if total + len(d["text"]) > max_chars:
            continue
        kept.add(d["id"])
        total += len(d["text"])
    return [d for d in docs if d["id"] in kept]


def build(stdlib: Path | None = None) -> tuple[list[dict], list[dict], dict]:
    """Records and pretraining documents of the stdlib, with splits; plus counts for the README."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    records, docs = collect(stdlib)
    n_raw_records = len(records)
    records = dedupe_records(records)
    # identical docstrings (re-exported or copied code) are kept once
    seen, unique_docs = set(), []
    for d in docs:
        if d["text"] not in seen:
            seen.add(d["text"])
            unique_docs.append(d)
    docs, n_leaky = drop_leaks(unique_docs, records)
    docs = cap_documents(docs)
    for d in docs:
        d["split"] = document_split(d["id"])
    stats = {
        "python": sys.version.split()[0],
        "records_before_dedupe": n_raw_records,
        "records": len(records),
        "documents_dropped_for_leaks": n_leaky,
        "documents": len(docs),
        "chars": sum(len(d["text"]) for d in docs),
    }
    return records, docs, stats


def write_jsonl_xz(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (sorted keys), xz-compressed; written to a temp file then renamed."""
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, preset=XZ_PRESET))
    os.replace(tmp, path)


def read_jsonl_xz(path: Path) -> list[dict]:
    """Inverse of `write_jsonl_xz`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m minilora.corpus`")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main() -> None:
    if sys.version.split()[0] != BUILT_WITH_PYTHON:
        print(f"note: Python {sys.version.split()[0]}'s stdlib differs from the committed build "
              f"({BUILT_WITH_PYTHON}); update BUILT_WITH_PYTHON and data/README.md if you keep the result")
    records, docs, stats = build()
    DATA_DIR.mkdir(exist_ok=True)
    write_jsonl_xz(RECORDS_PATH, records)
    write_jsonl_xz(CORPUS_PATH, docs)
    for k, v in stats.items():
        print(f"{k}: {v}")
    for p in (RECORDS_PATH, CORPUS_PATH):
        print(f"{p.name}: {p.stat().st_size:,} bytes")
    print("next: python -m minilora.tokenizer  (retrains data/tokenizer.bpe on the new text)")


if __name__ == "__main__":
    main()
