"""Moved to `edm2.ema.reconstruct`; this name stays for existing code (the same module object)."""

import sys

import edm2.ema.reconstruct

sys.modules[__name__] = edm2.ema.reconstruct
