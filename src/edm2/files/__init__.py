"""Every file edm2 reads or writes, by floor: `base` (atomic writes, temporaries, tensor files with metadata, the
format version); `snapshot` (model files), `run_folder` (training state, checkpoints, the lock), `pickles` (the
code-free reader of official pickles), `download` (files by URL, cached) and `pickle_convert` (official networks
to snapshots); `load` on top (`load_network`, any network file or URL)."""

from edm2.files.base import *  # noqa: F403
from edm2.files.base import __all__ as _base
from edm2.files.download import *  # noqa: F403
from edm2.files.download import __all__ as _download
from edm2.files.load import load_network
from edm2.files.run_folder import *  # noqa: F403
from edm2.files.run_folder import __all__ as _run_folder
from edm2.files.snapshot import *  # noqa: F403
from edm2.files.snapshot import __all__ as _snapshot

__all__ = [*_base, *_snapshot, *_run_folder, *_download, "load_network"]
