"""nox sessions, one module per concern, imported by ``noxfile.py`` (see README.md)."""
