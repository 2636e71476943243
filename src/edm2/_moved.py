"""The module names of earlier releases, kept importable: `import edm2.checkpoint` (or `edm2.posthoc`, ...) gives
the module that holds that code now, the same object, so existing code and monkeypatches keep working. Nothing in
the package imports these names; new code uses the homes on the right."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED = {
    "edm2.checkpoint": "edm2.files",
    "edm2.pickles": "edm2.files.pickles",
    "edm2.pickle_convert": "edm2.files.pickle_convert",
    "edm2.posthoc": "edm2.ema.trackers",
    "edm2.ema_trackers": "edm2.ema.trackers",
    "edm2.reconstruct": "edm2.ema.reconstruct",
    "edm2.sweep": "edm2.ema.sweep",
    "edm2.options": "edm2.training.options",
    "edm2.runlog": "edm2.training.runlog",
    "edm2.recipes": "edm2.training.recipes",
    "edm2.augment": "edm2.training.augment",
    "edm2.augment_geometry": "edm2.training.augment_geometry",
    "edm2.edm_losses": "edm2.losses",
    "edm2.dataset_tool": "edm2.data.tool",
    "edm2.dataset_writer": "edm2.data.writer",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name of `MOVED` and loads it as the module of its new name."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the new module ran when it was imported


def install() -> None:
    """Put the finder on `sys.meta_path` (once)."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
