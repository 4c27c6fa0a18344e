"""Progress bars for sweeps: shown only when a sweep takes more than a couple of seconds.

    >>> bar = progress(True, total=420, what="exact patching")
    >>> bar.update(64); bar.close()

A bar is tqdm's notebook-aware one (`tqdm.auto`), drawn after a two-second delay and
removed when it closes, so quick calls print nothing. `progress(False, ...)` is None,
which every sweep checks before updating.
"""

from __future__ import annotations


def progress(enabled: bool, total: int, what: str):
    """A tqdm bar of `total` runs titled `what`, or None when `enabled` is false."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="run", delay=2, leave=False)
