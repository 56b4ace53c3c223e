"""Regenerates data/corpus/ from the sources PROVENANCE.md names (run once; the
output is committed, so training never depends on this machine's files).

    python3 scripts/make-corpus.py /usr/share/common-licenses

Three domains, each a UTF-8 text of documents separated by a form feed (\\f):
  prose  the Python language reference's help topics (pydoc_data.topics, PSF-2.0)
  code   Python standard-library modules (PSF-2.0)
  legal  free-software licence texts (verbatim copies; each licence permits that)
"""

import hashlib
import os
import sys

import pydoc_data.topics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data", "corpus")
SEPARATOR = "\f"

CODE_MODULES = [
    "base64.py", "bisect.py", "calendar.py", "contextlib.py", "csv.py", "fractions.py",
    "functools.py", "gettext.py", "heapq.py", "os.py", "pprint.py", "random.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py", "uuid.py", "json/decoder.py",
    "json/encoder.py", "json/__init__.py",
]


def prose():
    topics = pydoc_data.topics.topics
    return [topics[name].strip() for name in sorted(topics)]


def code():
    lib = os.path.dirname(os.__file__)
    docs = []
    for name in CODE_MODULES:
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            docs.append(f"# {name}\n" + f.read().strip())
    return docs


def legal(licenses):
    seen, docs = set(), []
    for name in sorted(os.listdir(licenses)):
        path = os.path.realpath(os.path.join(licenses, name))
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            docs.append(f.read().strip())
    return docs


def main():
    licenses = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/common-licenses"
    os.makedirs(OUT, exist_ok=True)
    for domain, docs in [("prose", prose()), ("code", code()), ("legal", legal(licenses))]:
        text = SEPARATOR.join(docs) + "\n"
        path = os.path.join(OUT, f"{domain}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        print(f"{domain}: {len(docs)} documents, {len(text.encode())} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
