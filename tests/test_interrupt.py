"""SIGINT while `materialize` is writing leaves no partial output and exits 130 (issue 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from weit_cli.arch._registry import get_adapter
from weit_cli.arch.vit import ViTArch
from weit_cli.core.extract import from_dense
from weit_cli.io.bundle_file import save_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ad = get_adapter("vit")
    arch = ViTArch(img_size=32, patch_size=8, in_chans=3, num_classes=10, depth=2, width=64, num_heads=2)
    b, _ = from_dense(ad, arch, ad.build(arch).state_dict(), None, 8)
    p = tmp_path_factory.mktemp("b") / "bundle.safetensors"
    save_bundle(p, b)
    return p


@pytest.mark.parametrize("out_name", ["big.safetensors", "bigdir"])
def test_sigint_during_write_leaves_nothing(tmp_path, bundle_path, out_name):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # Large enough (~1.6 GB of float32) that the write is still running when we interrupt it.
    cmd = [sys.executable, "-m", "weit_cli.cli", "materialize", str(bundle_path), "--depth", "32",
           "--width", "2048", "-o", str(out_dir / out_name)]
    # A shell runs background jobs with SIGINT ignored, and children inherit that (Python then installs
    # no KeyboardInterrupt handler): give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(n.endswith(".tmp") for n in os.listdir(out_dir)):
        if proc.poll() is not None:
            pytest.fail(f"materialize ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.01)
    # At once: on an idle machine the whole write can take well under a second (page cache).
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert os.listdir(out_dir) == []
