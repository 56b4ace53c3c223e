"""Regenerates crates/corpus/texts/ from the sources PROVENANCE.md names (run once; the
output is committed, so training never depends on this machine's files).

    python3 scripts/make-corpus.py /usr/share/common-licenses [FORTUNES]

Each domain is a UTF-8 text of documents separated by a form feed (\\f). The
general domains (the zoo's pretraining mixture):
  prose  the Python language reference's help topics (pydoc_data.topics, PSF-2.0)
  code   Python standard-library modules (PSF-2.0)
  legal  free-software licence texts (verbatim copies; each licence permits that)
The study domains (the merging study's experts and held-out domains), written
when FORTUNES is given: a directory into which Debian's fortunes-de,
fortunes-es and fortunes-it packages were unpacked (`dpkg-deb -x`):
  german, spanish, italian  fortune cookies, one per document
  c      glibc's public headers (libc6-dev), licence comment removed, in pieces
  perl   Perl's core modules (perl-modules-5.36), in pieces
  cpp    libstdc++'s bits/ headers (libstdc++-12-dev), licence comment removed, in pieces
Study documents are shuffled with a fixed seed before the text is capped at
STUDY_BYTES, so the train / validation / evaluation splits are alike.
"""

import glob
import hashlib
import os
import random
import re
import subprocess
import sys

import pydoc_data.topics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "corpus", "texts")
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


STUDY_BYTES = 300_000
PIECE_BYTES = 4_000
# The comments a file opens with: the licence notice, when one is there.
LEADING_COMMENTS = re.compile(r"\A(\s*(/\*.*?\*/|//[^\n]*))+", re.S)
# Control characters other than tab and newline (terminal escapes in some fortunes).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def fortunes(root, language):
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/games/fortunes", language, "*"))):
        if path.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            docs += [d.strip() for d in re.split(r"^%$", f.read(), flags=re.M) if d.strip()]
    return docs


def package_files(package, pattern):
    listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    return sorted(p for p in listed.stdout.split("\n") if re.fullmatch(pattern, p))


def pieces(paths, strip_licence):
    """Source files cut at line boundaries into pieces of about PIECE_BYTES."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if strip_licence:
            match = LEADING_COMMENTS.match(text)
            if match and re.search(r"licen[cs]e", match.group(0), re.I):
                text = text[match.end():]
        piece = ""
        for line in text.splitlines(keepends=True):
            piece += line
            if len(piece) >= PIECE_BYTES:
                docs.append(piece.strip())
                piece = ""
        if piece.strip():
            docs.append(piece.strip())
    return [d for d in docs if d]


def capped(docs):
    docs = list(docs)
    random.Random(0).shuffle(docs)
    kept, size = [], 0
    for doc in docs:
        if size >= STUDY_BYTES:
            break
        kept.append(CONTROL.sub("", doc))
        size += len(doc.encode()) + 1
    return kept


def study(fortunes_root):
    return [
        ("german", capped(fortunes(fortunes_root, "de"))),
        ("spanish", capped(fortunes(fortunes_root, "es"))),
        ("italian", capped(fortunes(fortunes_root, "it"))),
        ("c", capped(pieces(package_files("libc6-dev", r"/usr/include/[^/]+\.h"), True))),
        ("perl", capped(pieces(package_files("perl-modules-5.36", r"/usr/share/perl/5[.0-9]+/[^/]+\.pm"), False))),
        ("cpp", capped(pieces(package_files("libstdc++-12-dev", r"/usr/include/c\+\+/12/bits/[^/]+\.h"), True))),
    ]


def main():
    licenses = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/common-licenses"
    os.makedirs(OUT, exist_ok=True)
    domains = [("prose", prose()), ("code", code()), ("legal", legal(licenses))]
    if len(sys.argv) > 2:
        domains += study(sys.argv[2])
    for domain, docs in domains:
        text = SEPARATOR.join(docs) + "\n"
        path = os.path.join(OUT, f"{domain}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        print(f"{domain}: {len(docs)} documents, {len(text.encode())} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
