"""Every file format of a run, in one place: names, key layouts, the atomic writer, the run folder and its lock.

Model files are safetensors with JSON metadata in the header; loading never executes code. Two kinds:
- snapshot (`kind: "snapshot"`): one model's state dict + sigma_rel, training time, the names of the
  averaged tensors, a free-form `info` dict, the encoder (how images map to the network's space), and the
  network: `network` holds the constructor arguments and `network_class` the official class name
  (`VPPrecond`, `VEPrecond`, `iDDPMPrecond`, `EDMPrecond`; absent: EDM2's `Precond`); `network` is None for
  models edm2 did not build. With them the network is rebuilt (`load_network`).
- checkpoint (`kind: "checkpoint"`): the full training state for resuming (network, Adam, EMAs, loss scale).

A run folder holds `training_options.json`, `log.txt`, `stats.jsonl`, `checkpoint-<nimg>.safetensors` (the
two newest), `snapshot-<nimg>-<sigma_rel>.safetensors`, and while a process trains it, a lock file.
Every file is written through `atomic_output`: a temporary `.<name>.<random>.tmp` beside the target,
synced, then renamed over it, so a reader sees the old or the complete new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import filelock
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edm2.networks import Precond, build_network
from edm2.presets import EDMNetworkConfig, NetworkConfig

__all__ = [
    "FORMAT", "VERSION", "OPTIONS_FILE", "LOG_FILE", "STATS_FILE", "LOCK_FILE", "KEEP_CHECKPOINTS",
    "atomic_output", "atomic_write_text", "remove_stale_temps", "scratch_folder",
    "checkpoint_filename", "snapshot_filename", "posthoc_filename", "ema_snapshot_filename", "find_checkpoints",
    "save_tensors", "load_tensors", "read_metadata", "Snapshot", "save_snapshot", "load_snapshot",
    "load_network", "save_training_state", "load_training_state", "RunLock", "check_run_folder",
    "network_from_metadata",
]

FORMAT = "edm2"
VERSION = 1
OPTIONS_FILE = "training_options.json"
LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"
LOCK_FILE = ".edm2-train.lock"
KEEP_CHECKPOINTS = 2
TEMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------------------------
# Atomic writes: the one way every file of a run (tensors, JSON, PNG, plots) reaches the disk.


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without error the file is synced
    and renamed over `path`, otherwise removed. Readers see either the old or the complete new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporaries `atomic_output` leaves when its process is killed mid-write. Call it only while
    holding the folder (`RunLock`), so that no live writer loses its file. Returns what was removed."""
    stale = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def scratch_folder(beside: str | Path) -> Iterator[Path]:
    """A temporary folder on the file system of `beside` (in its nearest existing parent), removed on leaving:
    for writes that are only timed or tried."""
    parent = Path(beside).absolute().parent
    while not parent.exists():
        parent = parent.parent
    with tempfile.TemporaryDirectory(prefix=".edm2-scratch-", dir=parent) as folder:
        yield Path(folder)


# ----------------------------------------------------------------------------------------------------
# Names.


def checkpoint_filename(nimg: int) -> str:
    """Name of the training-state checkpoint after `nimg` images."""
    return f"checkpoint-{int(nimg):010d}.safetensors"


def snapshot_filename(t: int, sigma_rel: float) -> str:
    """Name of the snapshot of the EMA `sigma_rel` at time `t` (the trainer's and PosthocEMA's naming)."""
    return f"snapshot-{int(t):010d}-{sigma_rel:.3f}.safetensors"


def ema_snapshot_filename(nimg: int) -> str:
    """Name of the snapshot of the traditional EMA (EDM-release runs) after `nimg` images."""
    return f"snapshot-{int(nimg):010d}-ema.safetensors"


def posthoc_filename(nimg: int, sigma_rel: float, tag: str = "") -> str:
    """Name of a reconstructed snapshot; `tag` distinguishes reconstructions with per-tensor lengths."""
    return f"posthoc-{int(nimg):010d}-{sigma_rel:.3f}{'-' + tag if tag else ''}.safetensors"


def find_checkpoints(outdir: str | Path) -> list[Path]:
    """Training-state checkpoints in `outdir`, oldest first."""
    return sorted(Path(outdir).glob("checkpoint-??????????.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Tensor files.


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically write `tensors` and JSON `metadata` (must include 'kind') as a safetensors file."""
    meta = {"format": FORMAT, "version": VERSION, **metadata}
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(meta)})


def read_metadata(path: str | Path, kind: str | None = None) -> dict:
    """The JSON metadata of an edm2 file; ValueError for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FORMAT)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or foreign?): {e}") from None
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without edm2 metadata; it was not written by edm2")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged edm2 metadata (not a JSON object); the file was not written by edm2")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path}: is an edm2 {meta.get('kind')!r} file, expected a {kind!r}")
    return meta


def load_tensors(path: str | Path, kind: str | None = None,
                 device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an edm2 file (no code is executed)."""
    meta = read_metadata(path, kind)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: truncated or damaged tensor data: {e}") from None
    return tensors, meta


# ----------------------------------------------------------------------------------------------------
# Snapshots.


@dataclass
class Snapshot:
    """A model's weights with what is needed to rebuild and describe it."""

    state_dict: dict[str, torch.Tensor]
    # EDM2 `Precond` arguments, or an EDM-release network (official class name and arguments); None: not an
    # edm2 network (a generic model tracked by PosthocEMA).
    network: NetworkConfig | EDMNetworkConfig | None
    sigma_rel: float | None  # EMA length, None for raw training weights
    nimg: int  # training time in images (or any growing count, for generic models)
    info: dict  # preset, dataset description, anything else JSON-able
    averaged_names: tuple[str, ...] | None = None  # tensors that are EMAs (the rest are copies, e.g. buffers)
    # How images map to the network's space and back, in the official encoder's terms: {"class":
    # "StandardRGBEncoder", "kwargs": {}} (uint8 pixels <-> [-1, 1]) or {"class": "StabilityVAEEncoder",
    # "kwargs": {"vae_name": ..., "raw_mean": [...], "raw_std": [...], "final_mean": ..., "final_std": ...}}.
    # None: not recorded (files written before encoders existed: standard RGB).
    encoder: dict | None = None

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network with these weights, in eval mode (a `Precond`, or an EDM preconditioning)."""
        if self.network is None:
            raise ValueError("snapshot holds no edm2 network config (a generic model); read its tensors with "
                             "edm2.checkpoint.load_tensors")
        if isinstance(self.network, EDMNetworkConfig):
            net = build_network(self.network.class_name, self.network.kwargs)
        else:
            net = Precond(**self.network.to_dict())
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"snapshot weights do not fit its network config: {str(e).splitlines()[0]}") from None
        return net.eval().requires_grad_(False).to(device)


def save_snapshot(path: str | Path, snapshot: Snapshot) -> None:
    """Atomically write a snapshot file (the one writer of snapshots: training, PosthocEMA, reconstruction)."""
    meta = {"kind": "snapshot", "network": None if snapshot.network is None else snapshot.network.to_dict(),
            "sigma_rel": snapshot.sigma_rel, "nimg": int(snapshot.nimg), "info": snapshot.info,
            "parameter_names": sorted(snapshot.state_dict), "encoder": snapshot.encoder}
    if isinstance(snapshot.network, EDMNetworkConfig):
        meta["network_class"] = snapshot.network.class_name
    if snapshot.averaged_names is not None:
        missing = sorted(set(snapshot.averaged_names) - set(snapshot.state_dict))
        if missing:
            raise ValueError(f"averaged tensors {missing[:3]} are not in the state dict to write to {path}")
        meta["averaged_names"] = sorted(snapshot.averaged_names)
    save_tensors(path, snapshot.state_dict, meta)


def network_from_metadata(network: dict | None, network_class: str | None) -> NetworkConfig | EDMNetworkConfig:
    """The network config a snapshot's metadata describes: `network_class` absent (None) means EDM2's
    `Precond` with arguments `network`, else the official class of the EDM release with arguments `network`."""
    if not isinstance(network, dict):
        raise ValueError(f"no network config (got {type(network).__name__})")
    if network_class is None:
        return NetworkConfig.from_dict(network)
    return EDMNetworkConfig(str(network_class), dict(network))


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file of an edm2 network (ValueError when it has no network config)."""
    tensors, meta = load_tensors(path, kind="snapshot")
    try:
        network = network_from_metadata(meta.get("network"), meta.get("network_class"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: snapshot metadata has no valid network config ({e})") from None
    averaged = meta.get("averaged_names")
    return Snapshot(tensors, network, meta.get("sigma_rel"), int(meta.get("nimg", 0)), meta.get("info", {}),
                    None if averaged is None else tuple(averaged), meta.get("encoder"))


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Snapshot]:
    """Rebuild the network stored in a snapshot file, in eval mode. An official network pickle (`.pkl`) is
    converted on the fly, without running its code (`edm2.pickle_convert`), with a warning."""
    if Path(path).suffix.lower() == ".pkl":
        from edm2.pickle_convert import snapshot_from_pickle  # it builds Snapshots: imported here, not above

        snap = snapshot_from_pickle(path)
        warnings.warn(f"{path}: an official pickle, converted on the fly (no code is run); convert it once with "
                      "'edm2 convert' to skip this", stacklevel=2)
        return snap.build(device), snap
    snap = load_snapshot(path)
    try:
        return snap.build(device), snap
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Training state. Keys: `net/<name>` (weights and buffers), `ema/<EMA state key>`, `adam/<param index>/<name>`
# (step, exp_avg, exp_avg_sq), `scaler/scale` and `scaler/growth_tracker` (fp16 loss scaling only).


def save_training_state(outdir: str | Path, nimg: int, run: dict, net: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, ema_state: dict[str, torch.Tensor] | None = None,
                        scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write `checkpoint-<nimg>.safetensors` into `outdir` and keep only the newest KEEP_CHECKPOINTS."""
    tensors = {f"net/{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in (ema_state or {}).items()})
    for i, st in optimizer.state_dict()["state"].items():
        tensors.update({f"adam/{i}/{k}": torch.as_tensor(v) for k, v in st.items()})
    if scaler is not None and scaler.is_enabled():
        st = scaler.state_dict()
        tensors["scaler/scale"] = torch.tensor(float(st["scale"]), dtype=torch.float64)
        tensors["scaler/growth_tracker"] = torch.tensor(int(st["_growth_tracker"]), dtype=torch.int64)
    path = Path(outdir) / checkpoint_filename(nimg)
    save_tensors(path, tensors, {"kind": "checkpoint", "nimg": int(nimg), "run": run})
    for old in find_checkpoints(outdir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_training_state(path: str | Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema=None, scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore what `save_training_state` wrote; returns the number of images seen. `ema` (anything with
    `load_state_dict`) may be None: only rank 0 tracks the averages."""
    tensors, meta = load_tensors(path, kind="checkpoint")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")}, strict=True)
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
    if scaler is not None and scaler.is_enabled() and "scaler/scale" in tensors:
        scaler.load_state_dict({**scaler.state_dict(), "scale": float(tensors["scaler/scale"]),
                                "_growth_tracker": int(tensors["scaler/growth_tracker"])})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("adam/"):
            _, i, name = k.split("/")
            state.setdefault(int(i), {})[name] = v
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, st in state.items():  # moments in their parameter's memory layout (channels_last too), as in the
        for name, v in st.items():  # uninterrupted run: the fused step's rounding depends on the layout
            if v.shape == params[i].shape:
                st[name] = torch.empty_like(params[i], dtype=v.dtype).copy_(v)
    opt_state = optimizer.state_dict()
    opt_state["state"] = state
    optimizer.load_state_dict(opt_state)
    return int(meta["nimg"])


# ----------------------------------------------------------------------------------------------------
# The run folder: who may train it, and whether it holds this run.


class RunLock:
    """One live training process per run folder. An OS file lock (the `filelock` package), so the kernel
    drops it when its process dies: a run killed by SIGKILL never blocks the next. The lock file names its
    holder (pid, host, start time) for the error a second process gets, and is removed on release."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._lock = filelock.FileLock(str(self.path), timeout=0, on_acquired=self._write_owner)

    @staticmethod
    def _write_owner(fd: int) -> None:
        owner = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)

    def owner(self) -> str:
        """Who holds the lock, as its file says."""
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def acquire(self) -> RunLock:
        """Take the lock or raise ValueError naming the folder and the process that holds it."""
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise ValueError(f"--outdir {self.folder} is being trained by another process ({self.owner()}); "
                             "wait for it to finish or stop it, or use another --outdir") from None
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.path.unlink(missing_ok=True)  # while still held, so no contender takes a file about to vanish
            self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_folder(outdir: str | Path, identity: dict) -> bool:
    """Whether `outdir` can hold the run whose identity (options that may not change on resume) is given:
    True when it already holds it (resume), False when it is absent or empty (new run). ValueError when it
    holds another run, damaged options, or foreign files. Reads only."""
    outdir = Path(outdir)
    options = outdir / OPTIONS_FILE
    if options.is_file():
        try:
            old = json.loads(options.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{options} is damaged; use a new --outdir") from None
        diff = sorted(k for k in identity if old.get(k) != identity[k])
        if diff:
            raise ValueError(f"--outdir {outdir} holds a different run (differs in {', '.join(diff)}); "
                             "use a new --outdir or the original options")
        return True
    if outdir.exists() and any(p.name != LOCK_FILE for p in outdir.iterdir()):
        raise ValueError(f"--outdir {outdir} is not empty and holds no edm2 run; choose a new or empty folder")
    return False
