"""The tests of the application layer: a package, so that its ``conftest`` does not replace ``tests/conftest.py`` as the
module ``conftest`` the other test folders import their helpers from."""
