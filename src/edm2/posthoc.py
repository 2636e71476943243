"""Moved to `edm2.ema.trackers`; this name stays for existing code (the same module object)."""

import sys

import edm2.ema.trackers

sys.modules[__name__] = edm2.ema.trackers
