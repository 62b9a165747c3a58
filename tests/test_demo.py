"""The main job runs end to end (short training) and writes its table and diagram."""

from __future__ import annotations

import math

from bayescurv import cli


def test_demo_cli_prints_table_and_writes_diagram(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("MAP", "LA last-layer K-FAC", "LA all-weights K-FAC", "OOD AUROC", "NLL rot30"):
        assert name in out
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    rows = [line.split() for line in out.splitlines() if line.startswith(("MAP", "LA "))]
    assert len(rows) == 3
    for row in rows:
        values = [float(v) for v in row[-8:]]
        assert all(math.isfinite(v) for v in values)
        assert 0.0 <= values[0] <= 1.0  # accuracy
