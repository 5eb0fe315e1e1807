"""benchmarks/quality.py's options: bad --targets are refused before anything runs."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("targets", ["4x", "4by128", "0x128", "4x128x2"])
def test_bad_targets_are_refused(targets, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    with pytest.raises(SystemExit) as e:
        quality.main(["--budget", "tiny", "--targets", targets, "--work", str(tmp_path / "w"), "--docs", str(tmp_path / "d")])
    assert e.value.code == 2 and "expected a comma list of DEPTHxWIDTH" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before the cache folder is made
