"""Files by URL (`edm2.files.download`) against a local HTTP server: the first download and its recorded digest,
cache hits without a request, resuming a dropped connection with a range request, refused checksums, one-line
errors that leave nothing behind, the mirror, offline use, the lock; and the users of downloads: `load_network`
(an official pickle converted once), `load_reference`, the detector weights, and `edm2 generate --net URL`."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from detector_weights import write_small_dinov2

import edm2.files.load as load_module
from edm2.cli import main
from edm2.files import load_network
from edm2.files.download import cache_dir, cached_path, download, is_url, mirror_url
from edm2.metrics.detectors import DETECTOR_DIR_ENV, DETECTORS, load_detector
from edm2.metrics.stats import MetricStats, load_reference, save_reference

PICKLES = Path(__file__).parent / "data" / "official_pickles"
PIXEL = (PICKLES / "edm2_pixel.pkl").read_bytes()
PIXEL_SHA = hashlib.sha256(PIXEL).hexdigest()


# ----------------------------------------------------------------------------------------------------
# A local HTTP server: serves `files` by path, answers `Range: bytes=N-`, counts requests and body bytes, and can
# drop the connection of the next request after N bytes, ignore ranges, or send slowly.


@dataclasses.dataclass
class Served:
    base: str = ""
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    requests: list[dict] = dataclasses.field(default_factory=list)
    drop_after: int | None = None  # the next request's body stops after this many bytes (then reset)
    ignore_range: bool = False  # answer 200 with the whole file even to a range request
    delay: float = 0.0  # seconds between 64 KiB pieces of a body

    def url(self, path: str) -> str:
        return self.base + path


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state: Served = self.server.state
        record = {"path": urllib.parse.urlsplit(self.path).path, "range": self.headers.get("Range"), "sent": 0,
                  "status": 200}
        state.requests.append(record)
        data = state.files.get(record["path"])
        if data is None:
            record["status"] = 404
            self.send_error(404, "Not Found")
            return
        m = re.fullmatch(r"bytes=(\d+)-", record["range"] or "")
        start = int(m.group(1)) if m and not state.ignore_range else 0
        if start >= len(data) > 0:
            record["status"] = 416
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        record["status"] = 206 if start else 200
        self.send_response(record["status"])
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if state.drop_after is not None:
            body, state.drop_after = body[:state.drop_after], None
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i:i + (1 << 16)])
            record["sent"] += len(body[i:i + (1 << 16)])
            time.sleep(state.delay)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = Served(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Downloads allowed (conftest forbids them), into a cache folder that does not exist yet."""
    monkeypatch.delenv("EDM2_OFFLINE", raising=False)
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def contents(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for f in fragments:
        assert f in message, f"{f!r} not in {message!r}"
    return message


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# Names and places.


def test_cache_location_urls_and_mirror(monkeypatch, tmp_path):
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDM2_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "edm2"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "edm2"
    monkeypatch.setenv("EDM2_CACHE", str(tmp_path / "c"))

    assert is_url("https://x/y.pkl") and is_url("HTTP://x/y.pkl")
    assert not is_url("file.pkl") and not is_url(Path("http://x/y.pkl")) and not is_url("ftp://x/y")
    url = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-xs-2147483-0.135.pkl"
    assert cached_path(url) == tmp_path / "c" / "nvlabs-fi-cdn.nvidia.com" / "edm2" / "posthoc-reconstructions" / \
        "edm2-img512-xs-2147483-0.135.pkl"
    assert cached_path("http://127.0.0.1:8080/a%20b/c.npz") == tmp_path / "c" / "127.0.0.1_8080" / "a b" / "c.npz"
    assert cached_path("https://h/x.pkl?v=1") != cached_path("https://h/x.pkl?v=2")
    assert cached_path("https://h/x.pkl?v=1").name == "x.pkl"
    for bad in ("https://h/", "https://h", "https://h/../x.pkl", "https://h/dir/"):
        with pytest.raises(ValueError, match="names no file"):
            cached_path(bad)

    assert mirror_url(url) == url
    monkeypatch.setenv("EDM2_MIRROR", "http://mirror.local/edm2-files/")
    assert mirror_url(url) == ("http://mirror.local/edm2-files/edm2/posthoc-reconstructions/"
                               "edm2-img512-xs-2147483-0.135.pkl")
    assert cached_path(url).parts[-4] == "nvlabs-fi-cdn.nvidia.com"  # the cache keeps the original URL


# ----------------------------------------------------------------------------------------------------
# Downloads.


def test_first_download_then_cache_hits_without_requests(server, cache, monkeypatch):
    server.files["/nets/edm2_pixel.pkl"] = PIXEL
    url = server.url("/nets/edm2_pixel.pkl")
    path = download(url, progress=False)
    assert path == cached_path(url) == cache / f"127.0.0.1_{url.split(':')[2].split('/')[0]}" / "nets" / \
        "edm2_pixel.pkl"
    assert path.read_bytes() == PIXEL
    assert (path.parent / "edm2_pixel.pkl.sha256").read_text().strip() == PIXEL_SHA
    assert sorted(p.name for p in path.parent.iterdir()) == ["edm2_pixel.pkl", "edm2_pixel.pkl.sha256"]
    assert [r["sent"] for r in server.requests] == [len(PIXEL)]

    assert download(url, progress=False) == path
    assert download(url, sha256=PIXEL_SHA.upper(), progress=False) == path
    monkeypatch.setenv("EDM2_OFFLINE", "1")  # a cached file needs no network
    assert download(url) == path
    assert len(server.requests) == 1


def test_a_dropped_connection_is_resumed_with_a_range_request(server, cache):
    server.files["/edm2_pixel.pkl"] = PIXEL
    url = server.url("/edm2_pixel.pkl")
    server.drop_after = 600_000
    with pytest.raises(ValueError) as e:
        download(url, progress=False)
    one_line_error(e, f"cannot download {url}", "600000 of 1478954 bytes", "run again to resume",
                   str(cached_path(url)))
    part = cached_path(url).with_name("edm2_pixel.pkl.part")
    assert part.stat().st_size == 600_000 and not cached_path(url).exists()
    assert not cached_path(url).with_name("edm2_pixel.pkl.lock").exists()

    path = download(url, sha256=PIXEL_SHA, progress=False)
    assert path.read_bytes() == PIXEL and not part.exists()
    assert server.requests[1]["range"] == "bytes=600000-" and server.requests[1]["status"] == 206
    assert server.requests[1]["sent"] == len(PIXEL) - 600_000


def test_a_server_without_ranges_and_a_complete_part(server, cache):
    server.files["/edm2_pixel.pkl"] = PIXEL
    url = server.url("/edm2_pixel.pkl")
    part = cached_path(url).with_name("edm2_pixel.pkl.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk" * 250)  # not even the file's beginning: the 200 answer replaces it
    server.ignore_range = True
    assert download(url, progress=False).read_bytes() == PIXEL
    assert server.requests[0]["range"] == "bytes=1000-" and server.requests[0]["sent"] == len(PIXEL)

    cached_path(url).unlink()
    part.write_bytes(PIXEL)  # killed after the last byte, before the rename: the server has nothing more
    server.ignore_range = False
    assert download(url, progress=False).read_bytes() == PIXEL
    assert server.requests[1]["status"] == 416 and server.requests[1]["sent"] == 0


def test_a_wrong_checksum_is_refused_and_nothing_kept(server, cache):
    server.files["/edm2_pixel.pkl"] = PIXEL
    url = server.url("/edm2_pixel.pkl")
    with pytest.raises(ValueError) as e:
        download(url, sha256="0" * 64, progress=False)
    one_line_error(e, url, PIXEL_SHA, "0" * 64, "deleted")
    assert contents(cache) == []
    with pytest.raises(ValueError, match="not 64 hexadecimal digits"):
        download(url, sha256="abc")
    assert len(server.requests) == 1


def test_a_changed_cached_file_is_refused_until_deleted(server, cache):
    server.files["/edm2_pixel.pkl"] = PIXEL
    url = server.url("/edm2_pixel.pkl")
    path = download(url, progress=False)
    path.write_bytes(PIXEL[:-1] + b"x")
    with pytest.raises(ValueError) as e:
        download(url, progress=False)
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    one_line_error(e, str(path), found, PIXEL_SHA, "delete it to download it again")
    assert len(server.requests) == 1
    path.unlink()
    assert download(url, progress=False).read_bytes() == PIXEL
    assert len(server.requests) == 2


def test_404_and_no_network_leave_nothing(server, cache):
    url = server.url("/nets/missing.pkl")
    with pytest.raises(ValueError) as e:
        download(url, progress=False)
    one_line_error(e, f"cannot download {url} (HTTP 404: Not Found); put the file at {cached_path(url)} by hand")
    assert contents(cache) == [] and len(server.requests) == 1

    url = f"http://127.0.0.1:{closed_port()}/edm2/net.pkl"
    with pytest.raises(ValueError) as e:
        download(url, progress=False)
    one_line_error(e, f"cannot download {url} (", "refused", str(cached_path(url)), "by hand")
    assert contents(cache) == []


def test_the_mirror_serves_what_the_original_url_names(server, cache, monkeypatch):
    url = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2_pixel.pkl"
    server.files["/files/edm2/posthoc-reconstructions/edm2_pixel.pkl"] = PIXEL
    monkeypatch.setenv("EDM2_MIRROR", server.url("/files"))
    path = download(url, progress=False)
    assert path == cache / "nvlabs-fi-cdn.nvidia.com" / "edm2" / "posthoc-reconstructions" / "edm2_pixel.pkl"
    assert path.read_bytes() == PIXEL
    assert server.requests[0]["path"] == "/files/edm2/posthoc-reconstructions/edm2_pixel.pkl"
    missing = "https://nvlabs-fi-cdn.nvidia.com/edm2/other.pkl"
    with pytest.raises(ValueError) as e:
        download(missing, progress=False)
    one_line_error(e, missing, "HTTP 404", f"via {server.url('/files/edm2/other.pkl')}")


def test_offline_uses_only_the_cache_and_files_put_there_by_hand(server, cache, monkeypatch):
    monkeypatch.setenv("EDM2_OFFLINE", "1")
    server.files["/edm2_pixel.pkl"] = PIXEL
    url = server.url("/edm2_pixel.pkl")
    with pytest.raises(ValueError) as e:
        download(url)
    one_line_error(e, url, "EDM2_OFFLINE", str(cached_path(url)), "by hand")
    assert server.requests == [] and contents(cache) == []

    cached_path(url).parent.mkdir(parents=True)
    cached_path(url).write_bytes(PIXEL)  # filled by hand: its digest is recorded on first use
    assert download(url, sha256=PIXEL_SHA).read_bytes() == PIXEL
    assert cached_path(url).with_name("edm2_pixel.pkl.sha256").read_text().strip() == PIXEL_SHA
    cached_path(url).write_bytes(PIXEL[:100])
    with pytest.raises(ValueError, match="delete it"):
        download(url)


def test_the_lock_keeps_one_download_and_stale_locks_are_taken_over(server, cache):
    server.files["/edm2_pixel.pkl"] = PIXEL
    url = server.url("/edm2_pixel.pkl")
    server.delay = 0.02  # ~0.5 s for the file: the second caller finds the lock held
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(download(url, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(p.read_bytes() == PIXEL for p in results)
    assert len(server.requests) == 1

    server.delay = 0.0
    other = server.url("/other.pkl")
    server.files["/other.pkl"] = PIXEL[:5000]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = cached_path(other).with_name("other.pkl.lock")
    lock.write_text(f"{socket.gethostname()} {gone.pid}\n")  # a lock of a process that has ended
    assert download(other, progress=False).read_bytes() == PIXEL[:5000]
    assert not lock.exists()


# ----------------------------------------------------------------------------------------------------
# The users: networks, reference statistics, detector weights, the command line.


def test_load_network_from_a_url_converts_the_pickle_once(server, cache, monkeypatch):
    server.files["/nets/edm2_pixel.pkl"] = PIXEL
    url = server.url("/nets/edm2_pixel.pkl")
    with pytest.warns(UserWarning, match="converted on the fly"):
        local_net, local = load_network(PICKLES / "edm2_pixel.pkl")
    with pytest.warns(UserWarning, match="converted once"):
        net, snap = load_network(url)
    converted = cached_path(url).with_name("edm2_pixel.safetensors")
    assert converted.is_file()

    def no_conversion(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(load_module, "snapshot_from_pickle", no_conversion)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again_net, again = load_network(url)
    assert len(server.requests) == 1
    for n, s in ((net, snap), (again_net, again)):
        assert type(n) is type(local_net) and s.network == local.network and s.encoder == local.encoder
        assert (s.sigma_rel, s.nimg, s.info) == (local.sigma_rel, local.nimg, local.info)
        ours, theirs = n.state_dict(), local_net.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_load_reference_from_a_url(server, cache, tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal([8, 8])
    stats = {"fid": MetricStats(rng.standard_normal(8), a @ a.T, 20)}
    save_reference(tmp_path / "ref.npz", stats, (16, 16))
    server.files["/refs/ref.npz"] = (tmp_path / "ref.npz").read_bytes()
    url = server.url("/refs/ref.npz")
    ref = load_reference(url)
    assert ref.source == url and ref.resolution == (16, 16) and ref.num_images == 20
    np.testing.assert_array_equal(ref.stats["fid"].mu, stats["fid"].mu)
    np.testing.assert_array_equal(ref.stats["fid"].sigma, stats["fid"].sigma)
    assert load_reference(url).source == url and len(server.requests) == 1
    with pytest.raises(ValueError, match="HTTP 404"):
        load_reference(server.url("/refs/none.npz"))


def test_detector_weights_come_from_the_cache_without_a_folder(server, cache, monkeypatch, tmp_path):
    monkeypatch.delenv(DETECTOR_DIR_ENV, raising=False)
    weights = write_small_dinov2(tmp_path / "weights")
    server.files["/dinov2/dinov2_vitl14_pretrain.pth"] = weights.read_bytes()
    monkeypatch.setitem(DETECTORS, "fd_dinov2", dataclasses.replace(
        DETECTORS["fd_dinov2"], url=server.url("/dinov2/dinov2_vitl14_pretrain.pth")))
    monkeypatch.setenv("EDM2_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        load_detector("fd_dinov2")
    one_line_error(e, "--detector-dir DIR or set", "cannot download", "EDM2_OFFLINE")
    monkeypatch.delenv("EDM2_OFFLINE")
    det = load_detector("fd_dinov2")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_detector("fd_dinov2", empty).feature_dim == det.feature_dim  # a folder without the file
    assert len(server.requests) == 1
    images = torch.randint(0, 256, [2, 3, 32, 32], dtype=torch.uint8)
    torch.testing.assert_close(det(images), load_detector("fd_dinov2", weights.parent)(images))
    with pytest.raises(ValueError, match="does not exist"):  # a folder named wrongly is not hidden by the cache
        load_detector("fd_dinov2", tmp_path / "typo")


def test_generate_from_a_missing_url_is_one_line(server, cache, tmp_path):
    url = server.url("/nets/missing.pkl")
    result = CliRunner().invoke(main, ["generate", "--net", url, "--grid", str(tmp_path / "g.png"), "--seeds",
                                       "0-1", "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edm2: error: cannot download {url} (HTTP 404"), lines
    assert str(cached_path(url)) in lines[0] and result.stdout == ""
    assert not (tmp_path / "g.png").exists() and contents(cache) == []
