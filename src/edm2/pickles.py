"""Moved to `edm2.files.pickles`; this name stays for existing code (the same module object)."""

import sys

import edm2.files.pickles

sys.modules[__name__] = edm2.files.pickles
