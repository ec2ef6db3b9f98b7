"""An mkdocs hook: the docstrings' Sphinx roles (``:func:`name```) read as code in the site, as in the source."""

import re

ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):(?=<code>)")


def on_page_content(html, **kwargs):
    return ROLE.sub("", html)
