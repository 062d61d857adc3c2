"""Loader for the compiled core ``geosample._C`` (pybind11 over csrc/).

``pip install .`` builds it (or fails); an install made with GEOSAMPLE_NO_CPP=1 has none.  Setting
GEOSAMPLE_NO_CPP=1 before the import also hides a built extension.  Either way ``has_cpp()`` is
then False and every caller uses its Python path.
"""
from __future__ import annotations

import os

_C = None
if os.environ.get("GEOSAMPLE_NO_CPP", "") in ("", "0"):
    try:  # a GEOSAMPLE_NO_CPP=1 install has no extension
        from . import _C  # type: ignore[attr-defined,no-redef]
    except ImportError:  # pragma: no cover - depends on how the package was built
        _C = None


def has_cpp() -> bool:
    """True when the C++ extension ``geosample._C`` was built, imports, and is not disabled."""
    return _C is not None
