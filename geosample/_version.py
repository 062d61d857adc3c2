"""The package version, in one place: pyproject.toml, CMakeLists.txt and the C++ header read it here."""
__version__ = "0.1.0"
