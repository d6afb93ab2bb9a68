"""The GitHub Actions job summary: Markdown appended to the file named by ``$GITHUB_STEP_SUMMARY``
(https://docs.github.com/actions/using-workflows/workflow-commands-for-github-actions#adding-a-job-summary)."""

from __future__ import annotations

import os
from collections.abc import Iterable


def append_step_summary(markdown: Iterable[str]) -> bool:
    """Append each text, a blank line after each, when ``$GITHUB_STEP_SUMMARY`` is set; False when not."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    with open(target, "a", encoding="utf-8") as fh:
        for text in markdown:
            fh.write(text.rstrip("\n") + "\n\n")
    return True
