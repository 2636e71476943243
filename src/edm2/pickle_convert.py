"""Moved to `edm2.files.pickle_convert`; this name stays for existing code (the same module object)."""

import sys

import edm2.files.pickle_convert

sys.modules[__name__] = edm2.files.pickle_convert
