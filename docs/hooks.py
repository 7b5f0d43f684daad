"""MkDocs hooks (``hooks:`` in mkdocs.yml): two pages that live outside ``docs/``.

The README is the site's home page and ``middleware/README.md`` its client page, so that each
is written once and reads right on GitHub too. Links are written as repository paths relative
to the file (``docs/api.md`` in the README, ``../middleware/README.md`` in a page here); this
maps each to its page on the site. A link to any other file outside ``docs/`` is left as it is,
so the strict build reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
#: Repository path -> page on the site.
EXTERNAL = {"README.md": "index.md", "middleware/README.md": "middleware.md"}
_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for source, page in EXTERNAL.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / source)))
    return files


def site_link(source: str, target: str, page_uri: str) -> str | None:
    """The link from ``page_uri`` (on the site) for ``target`` written in repository file
    ``source``; None when it is not a repository path this maps."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
    if path in EXTERNAL:
        page = EXTERNAL[path]
    elif path.startswith("docs/"):
        page = path.removeprefix("docs/")
    else:
        return None
    return posixpath.relpath(page, posixpath.dirname(page_uri) or ".")


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    assert page.file.abs_src_path is not None
    source = Path(page.file.abs_src_path).resolve().relative_to(ROOT).as_posix()

    def fix(match: re.Match[str]) -> str:
        link = site_link(source, match["target"], page.file.src_uri)
        if link is None:
            return match[0]
        return f"]({link}{match['anchor'] or ''})"

    return _LINK.sub(fix, markdown)
