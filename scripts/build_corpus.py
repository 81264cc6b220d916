"""Build workers/engine/data/corpus.txt: the docstrings of a fixed list of Python standard-library
modules (PSF-licensed text every Python install carries), ASCII only, paragraphs deduplicated.

The file is committed so every machine trains on the same bytes whatever its Python version;
this script documents where they came from and rebuilds them.

    python scripts/build_corpus.py
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = ["argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
           "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html",
           "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
           "logging", "mailbox", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
           "queue", "random", "re", "shlex", "shutil", "smtplib", "socket", "statistics",
           "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
           "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings",
           "weakref", "zipfile"]
OUT = Path(__file__).resolve().parents[1] / "workers" / "engine" / "data" / "corpus.txt"


def docstrings(mod: object) -> list[str]:
    out = [inspect.getdoc(mod) or ""]
    for _, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", None) != getattr(mod, "__name__", None):
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for _, meth in sorted(vars(obj).items()):
                    if inspect.isfunction(meth):
                        out.append(inspect.getdoc(meth) or "")
    return out


def main() -> None:
    seen: set[str] = set()
    paras: list[str] = []
    for name in MODULES:
        for doc in docstrings(importlib.import_module(name)):
            for para in doc.split("\n\n"):
                para = para.encode("ascii", "ignore").decode().strip()
                if len(para) >= 40 and para not in seen:
                    seen.add(para)
                    paras.append(para)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(paras) + "\n")
    print(f"{OUT}: {OUT.stat().st_size:,} bytes, {len(paras)} paragraphs")


if __name__ == "__main__":
    main()
