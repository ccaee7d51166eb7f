"""What `weavepy launch` imports: a configuration loads only what it uses (idle RSS, issue 16).

Each check runs a fresh interpreter, imports what the launch command imports, and looks at
sys.modules: numpy belongs to the encrypted data path, lightkube to --kube-peers, and the
development tooling to the sandbox and chaos commands.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

LAUNCH_IMPORTS = "import weavepy.cli, weavepy.agent"


def modules_after(code: str) -> set[str]:
    program = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("package", ["numpy", "lightkube", "weavepy.devtools"])
def test_launch_without_its_feature_does_not_import(package: str) -> None:
    loaded = modules_after(LAUNCH_IMPORTS)
    assert not {m for m in loaded if m == package or m.startswith(package + ".")}


def test_the_encrypted_path_brings_its_data_plane_when_it_starts() -> None:
    loaded = modules_after(f"{LAUNCH_IMPORTS}\nimport tunnel.wireguard.device")
    assert "numpy" in loaded  # the control for the test above: the data plane does use it
