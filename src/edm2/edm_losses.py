"""Moved to `edm2.losses`; this name stays for existing code (the same module object)."""

import sys

import edm2.losses

sys.modules[__name__] = edm2.losses
