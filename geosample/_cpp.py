"""Loader for the optional compiled core ``geosample._C`` (pybind11 over csrc/)."""
from __future__ import annotations

try:  # the extension is optional: a pure-Python install has none
    from . import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on how the package was built
    _C = None


def has_cpp() -> bool:
    """True when the C++ extension ``geosample._C`` was built and imports."""
    return _C is not None
