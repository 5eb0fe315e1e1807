"""Hostile files and concurrent or failing writers (issue 5): the reader says InputError and nothing
else; a failed write leaves no output and no temp file behind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weit_cli.errors import InputError, OutputError
from weit_cli.io.files import (
    KIND_TEMPLATES,
    base_metadata,
    load_weit,
    read_header,
    save_tensors,
)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_file(path: Path) -> bytes:
    tensors = {"templates.qkv": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), "small.x": torch.ones(3)}
    save_tensors(path, tensors, base_metadata(KIND_TEMPLATES, architecture={"family": "vit"}), force=True)
    return path.read_bytes()


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_are_rejected_cleanly(tmp_path, data):
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    with pytest.raises(InputError):
        load_weit(p, KIND_TEMPLATES)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_truncated_or_mutated_bundle(tmp_path, cut, flips):
    p = tmp_path / "b.safetensors"
    good = bytearray(_valid_file(p))
    bad = good[: cut % (len(good) + 1)]
    for pos, val in flips:
        if bad:
            bad[pos % len(bad)] = val
    p.write_bytes(bytes(bad))
    try:
        tensors, meta = load_weit(p, KIND_TEMPLATES)
    except InputError:
        return
    # A mutation that survives must still be a well-formed file of the expected kind.
    assert meta["kind"] == KIND_TEMPLATES
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_header_claiming_huge_size(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(InputError, match="header claims"):
        read_header(p)


def test_offsets_past_end_of_file(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    p = tmp_path / "short.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(InputError, match="truncated"):
        read_header(p)


def test_nan_in_bundle_is_refused(tmp_path):
    p = tmp_path / "nan.safetensors"
    save_tensors(p, {"templates.qkv": torch.tensor([1.0, float("nan")])}, base_metadata(KIND_TEMPLATES), force=True)
    with pytest.raises(InputError, match="non-finite"):
        load_weit(p, KIND_TEMPLATES)


def test_no_overwrite_without_force(tmp_path):
    p = tmp_path / "b.safetensors"
    before = _valid_file(p)
    with pytest.raises(OutputError, match="already exists"):
        save_tensors(p, {"x": torch.zeros(2)}, {}, force=False)
    assert p.read_bytes() == before


def test_output_folder_missing_or_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "nope" / "b.safetensors", tmp_path / "afile" / "b.safetensors"):
        with pytest.raises(OutputError, match="does not exist"):
            save_tensors(out, {"x": torch.zeros(2)}, {})


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs: writes of anything bigger fail with ENOSPC. Needs root and mount."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_leaves_nothing(tiny_fs):
    out = tiny_fs / "big.safetensors"
    with pytest.raises(OutputError, match="disk space"):
        save_tensors(out, {"x": torch.zeros(1_000_000)}, {})
    assert list(tiny_fs.iterdir()) == []


WRITER = r"""
import sys, torch
from weit_cli.io.files import save_tensors
i = int(sys.argv[2])
save_tensors(sys.argv[1], {"x": torch.full((2_000_000,), float(i))}, {"writer": str(i)}, force=True)
"""


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    out = tmp_path / "same.safetensors"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(i)]) for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    from safetensors.torch import load_file

    x = load_file(str(out))["x"]
    assert x.numel() == 2_000_000 and (x == x[0]).all() and x[0].item() in (0.0, 1.0, 2.0)
    assert sorted(os.listdir(tmp_path)) == ["same.safetensors"]
