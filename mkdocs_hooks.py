"""mkdocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

The docstrings of ``pml_rll`` use Sphinx roles (``:class:`NAMRLoss```), which Markdown renders as the role's name
followed by code; the API pages show the code alone.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|exc|obj):(<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    """Drop the Sphinx role prefixes from a page's HTML (``:func:<code>x</code>`` becomes ``<code>x</code>``)."""
    return ROLE.sub(r"\1", html)
