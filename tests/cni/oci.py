"""A one-layer OCI image built offline from Debian's busybox-static, for containerd tests.

The layout follows the OCI image-spec (image-layout, index, manifest, config, a gzipped tar
layer); `ctr image import` takes the tarball. The image name goes in the index annotation
`io.containerd.image.name`, which is where containerd's importer looks for it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o1777 if name == "tmp" else 0o755
    tar.addfile(info)


def _layer(busybox: str) -> bytes:
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            _add_dir(tar, directory)
        data = Path(busybox).read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in sorted(set(applets) - {"busybox"}):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                           ("etc/group", "root:x:0:\n")):
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))
    return raw.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def build_image(target: Path, name: str, cmd: Sequence[str], busybox: str = BUSYBOX) -> Path:
    """Write an OCI image-layout tarball of busybox named `name` running `cmd`."""
    layer = _layer(busybox)
    compressed = gzip.compress(layer, mtime=0)
    blobs: dict[str, bytes] = {}
    layer_digest = _blob(blobs, compressed)
    config: dict[str, Any] = {
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    config_bytes = json.dumps(config).encode()
    config_digest = _blob(blobs, config_bytes)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": len(compressed)}],
    }).encode()
    manifest_digest = _blob(blobs, manifest)
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": len(manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
    }]}).encode()
    with tarfile.open(target, "w") as out:
        entries = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                   "index.json": index}
        entries.update({f"blobs/sha256/{d.split(':', 1)[1]}": b for d, b in blobs.items()})
        for path, payload in entries.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(payload), 0o644
            out.addfile(info, io.BytesIO(payload))
    return target
