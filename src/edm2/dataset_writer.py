"""Moved to `edm2.data.writer`; this name stays for existing code (the same module object)."""

import sys

import edm2.data.writer

sys.modules[__name__] = edm2.data.writer
