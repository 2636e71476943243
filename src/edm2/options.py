"""Moved to `edm2.training.options`; this name stays for existing code (the same module object)."""

import sys

import edm2.training.options

sys.modules[__name__] = edm2.training.options
