"""A judge for any class-conditional pixel dataset: a small convolutional classifier trained once on the dataset
(held-out images excluded), stored as safetensors with its metadata and the features of the held-out real images.

It reports how often generated samples are recognised as their conditioning class, and the Frechet distance
between generated and held-out real images in its feature space (the 128 activations before the last layer): the
FID recipe with a judge that knows the data. Numbers are comparable between runs judged by the same file and the
same number of samples (the Frechet distance is biased upwards for small sample counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edm2.data import ImageDataset, to_model_space
from edm2.files import load_tensors, save_tensors
from edm2.metrics.digits import JudgeReport, class_samples
from edm2.metrics.frechet import frechet_distance

__all__ = ["JudgeNet", "Judge", "train_judge", "JudgeQuality", "quality_for_run", "pick_judge", "FEATURES",
           "JUDGE_FILE"]

FEATURES = 128
WIDTHS = (16, 32)


class JudgeNet(nn.Module):
    """Two stages of two 3x3 convolutions with ReLU and 2x2 max pooling (the second pooling only for images of 16
    pixels or more), 4x4 average pooling, a 128-wide feature layer and the class layer."""

    def __init__(self, resolution: int, channels: int, num_classes: int) -> None:
        super().__init__()
        a, b = WIDTHS
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.Conv2d(b, b, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2) if resolution >= 16 else nn.Identity(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(16 * b, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 128], class logits [N, num_classes]) of images [N, C, R, R] in [-1, 1]."""
        f = self.body(x)
        return f, self.head(f)


@dataclass
class Judge:
    """A trained `JudgeNet` with the features of the held-out real images it measures distances to."""

    net: JudgeNet
    real_features: np.ndarray  # [N, 128]
    real_accuracy: float  # on the held-out real images
    info: dict  # dataset description, training settings

    @torch.no_grad()
    def run(self, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(features, predicted classes) of images [N, C, R, R] in [-1, 1]."""
        net = self.net.eval()
        shape = (self.net.channels, self.net.resolution, self.net.resolution)
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"this judge takes images of shape {list(shape)}, got {list(images.shape[1:])}")
        feats, preds = [], []
        for part in torch.as_tensor(images, dtype=torch.float32).clip(-1, 1).split(batch):
            f, logits = net(part)
            feats.append(f.double().numpy())
            preds.append(logits.argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds)

    def evaluate(self, images: torch.Tensor, classes: torch.Tensor | np.ndarray) -> JudgeReport:
        """Class accuracy and Frechet distance to the held-out real images of generated `images` in [-1, 1]
        conditioned on `classes`."""
        feats, preds = self.run(images)
        accuracy = float((preds == np.asarray(classes)).mean())
        return JudgeReport(accuracy, frechet_distance(feats, self.real_features), len(feats))

    def save(self, path: str | Path) -> None:
        """Write the judge as a safetensors file (kind 'judge'), atomically."""
        tensors = {f"net/{k}": v for k, v in self.net.state_dict().items()}
        tensors["real_features"] = torch.from_numpy(self.real_features.astype(np.float32))
        n = self.net
        save_tensors(path, tensors, {"kind": "judge", "resolution": n.resolution, "channels": n.channels,
                                     "num_classes": n.num_classes, "real_accuracy": self.real_accuracy,
                                     "info": self.info})

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        """Read a judge written by `save` (no code is executed)."""
        tensors, meta = load_tensors(path, kind="judge")
        try:
            net = JudgeNet(int(meta["resolution"]), int(meta["channels"]), int(meta["num_classes"]))
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")})
            feats = tensors["real_features"].double().numpy()
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: damaged judge file ({str(e).splitlines()[0]})") from None
        return cls(net.eval(), feats, float(meta["real_accuracy"]), meta.get("info", {}))


def _split(n: int, seed: int, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, 7]).permutation(n)
    return order[held_out:], order[:held_out]


def train_judge(dataset: ImageDataset, seed: int = 0, images: int = 60_000, batch: int = 64, lr: float = 2e-3,
                held_out: int = 2000, progress: Callable[[int, int], None] | None = None) -> Judge:
    """Train a judge on a labelled dataset: `images` training images (several passes over a small dataset) in
    batches of `batch`, Adam with a cosine-decayed learning rate, on all but `held_out` images (at most a fifth
    of the dataset), which give the real accuracy and the reference features."""
    if not dataset.has_labels or dataset.num_classes < 2:
        raise ValueError(f"{dataset.name}: a judge needs labelled data with at least 2 classes")
    held_out = min(held_out, len(dataset) // 5)
    if held_out < 10:
        raise ValueError(f"{dataset.name}: {len(dataset)} images are too few for a judge (needs 50 or more)")
    train_idx, test_idx = _split(len(dataset), seed, held_out)
    torch.manual_seed(seed)
    net = JudgeNet(dataset.resolution, dataset.channels, dataset.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = max(1, images // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng([seed, 8])
    labels = torch.from_numpy(dataset.labels)
    net.train()
    for step in range(steps):
        idx = rng.choice(train_idx, batch)
        x = to_model_space(torch.from_numpy(dataset.images[idx]))
        loss = nn.functional.cross_entropy(net(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps)
    judge = Judge(net.eval(), np.zeros([0, FEATURES]), 0.0,
                  {"dataset": dataset.describe(), "seed": seed, "images": steps * batch, "held_out": held_out})
    feats, preds = judge.run(to_model_space(torch.from_numpy(dataset.images[test_idx])))
    judge.real_features = feats
    judge.real_accuracy = float((preds == dataset.labels[test_idx]).mean())
    return judge


@dataclass
class JudgeQuality:
    """Sample-quality metric of a class-conditional snapshot for `edm2.ema.sweep.ema_sweep`: `num_samples` samples
    (seed i has class i mod the number of classes, the same seeds for every snapshot) with `num_steps` Heun
    steps, judged: Frechet distance `fd` (lower is better) and class `accuracy`."""

    judge: Judge
    num_samples: int = 500
    num_steps: int = 18
    device: str = "cpu"
    batch: int = 250

    def __call__(self, path: Path) -> dict[str, float]:
        from edm2.files import load_network

        net, _ = load_network(path, self.device)
        j = self.judge.net
        if (net.img_resolution, net.img_channels, net.label_dim) != (j.resolution, j.channels, j.num_classes):
            raise ValueError(f"{path}: the model makes {net.img_resolution}x{net.img_resolution}x{net.img_channels} "
                             f"images of {net.label_dim} classes but the judge takes {j.resolution}x{j.resolution}x"
                             f"{j.channels} of {j.num_classes}; train a judge on the model's dataset")
        images, classes = class_samples(net, self.num_samples, self.num_steps, self.device, self.batch)
        report = self.judge.evaluate(images, classes)
        return {"fd": report.fd, "accuracy": report.accuracy}


JUDGE_FILE = "judge.safetensors"


def quality_for_run(source: str | Path, num_samples: int, num_steps: int, device: str = "cpu",
                    judge_path: str | Path | None = None, data: str | None = None, judge_images: int = 60_000,
                    echo: Callable[[str], None] | None = None) -> tuple[Callable[[Path], dict[str, float]], str]:
    """The sweep metric for the class-conditional model whose snapshots are in `source`, and a title for its plot:
    the judge of `pick_judge` (kept as `source/judge.safetensors` when trained here)."""
    from edm2.ema.reconstruct import scan_snapshots
    from edm2.files import read_metadata
    from edm2.metrics.digits import DigitsJudge, DigitsQuality

    meta = read_metadata(scan_snapshots(source, allow_gaps=True)[0].path)
    judge, name = pick_judge(meta.get("network") or {}, meta.get("info") or {}, Path(source), judge_path, data,
                             judge_images, echo)
    if isinstance(judge, DigitsJudge):
        return DigitsQuality(judge, num_samples, num_steps, device), name
    return JudgeQuality(judge, num_samples, num_steps, device), name


def pick_judge(network: dict, info: dict, store: Path, judge_path: str | Path | None = None, data: str | None = None,
               judge_images: int = 60_000, echo: Callable[[str], None] | None = None) -> tuple[object, str]:
    """The judge of a class-conditional model (`network`, `info`: its snapshot metadata) and the data's name: the
    digits judge for a digits model (unless `judge_path` is given), else the judge in `judge_path`, else
    `store/judge.safetensors`, trained there on first use (`judge_images` training images) on `data` (default:
    the dataset the model trained on)."""
    from edm2.data import open_dataset
    from edm2.metrics.digits import DigitsJudge

    shape = (network.get("img_resolution"), network.get("img_channels"), network.get("label_dim"))
    if not shape[2]:
        raise ValueError(f"{store}: the model is unconditional; the judge measures class-conditional models by class "
                         "accuracy and Frechet distance")
    name = (info.get("dataset") or {}).get("name", str(store))
    if judge_path is None and data is None and name == "digits" and shape == (8, 1, 10):
        return DigitsJudge(), "digits"
    path = Path(judge_path) if judge_path is not None else store / JUDGE_FILE
    if not path.exists():
        if judge_path is not None:
            raise ValueError(f"--judge {judge_path}: no such file; train one with `edm2 judge train`")
        data = data or info.get("data")
        if not data or (data != "digits" and not Path(data).exists()):
            raise ValueError(f"{store}: the model's dataset {data!r} is not reachable from here; pass --data PATH or "
                             "--judge FILE")
        if echo is not None:
            echo(f"training a judge on {data} (once; stored as {path}) ...")
        judge = train_judge(open_dataset(data), images=judge_images)
        path.parent.mkdir(parents=True, exist_ok=True)
        judge.save(path)
    else:
        judge = Judge.load(path)
    if echo is not None:
        echo(f"judge {path}: held-out real accuracy {100 * judge.real_accuracy:.1f} %")
    return judge, name
