"""One home for the library's once-per-process warnings (a fallback to a slower path, a rule the user
should hear about once): keyed by what they are about, e.g. ``"block:<reason>"``."""
from __future__ import annotations

import warnings
from typing import Type

_seen: set[str] = set()


def warn_once(key: str, message: str, category: Type[Warning] = RuntimeWarning, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key not in _seen:
        _seen.add(key)
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def forget(prefix: str = "") -> None:
    """Lets the warnings whose key starts with ``prefix`` fire again (tests)."""
    for key in [k for k in _seen if k.startswith(prefix)]:
        _seen.discard(key)
