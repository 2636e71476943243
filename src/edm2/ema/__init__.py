"""Exponential moving averages, the whole story: the power-function math and the EMA classes (`power`, also
reachable as `edm2.ema` itself), the trackers that write snapshots during training (`trackers`), post-hoc
reconstruction of any EMA length from those snapshots (`reconstruct`), and the sweep of sample quality against
EMA length (`sweep`)."""

from edm2.ema.power import *  # noqa: F403
from edm2.ema.power import __all__ as _power
from edm2.ema.trackers import EMATrackers, PosthocEMA, TraditionalEMATracker

__all__ = [*_power, "PosthocEMA", "TraditionalEMATracker", "EMATrackers"]
