"""MkDocs hook: the Benchmarks page shows benchmarks/RESULTS.md as it is at build time.

A page's markdown holds a line `<!-- vitune:include benchmarks/RESULTS.md -->` (a path relative
to the repository root); the file's text replaces that line, without its own `# ` title (the
page has one). The results are written once, by the benchmark scripts' authors, into
RESULTS.md; the site never holds a second copy that could fall behind it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- vitune:include (?P<path>\S+) -->$", re.M)


def included_text(path: str) -> str:
    """The text of `path` (relative to the repository root) without its first `# ` title line."""
    text = (ROOT / path).read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: included_text(m.group("path")), markdown)


def on_serve(server, config, builder):
    # `mkdocs serve` rebuilds when an included file changes, as it does for the pages
    server.watch(str(ROOT / "benchmarks" / "RESULTS.md"))
    return server
