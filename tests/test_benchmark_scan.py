"""tools/benchmark_scan.py: its explicit cross-scan/merge is VMamba's, and it runs end to end."""
import csv

import pytest
import torch

from zoo import load_tool

bench = load_tool("benchmark_scan")


def test_merge_is_the_adjoint_of_the_cross_scan():
    """merge(scan(x)) = 4x for a route-independent x, and route 1 really is the column-major order."""
    x = torch.randn(2, 3, 4, 5)
    routes = bench.cross_scan_copies(x.unsqueeze(1).expand(2, 4, 3, 4, 5))
    assert torch.equal(routes[:, 1, :, :4], x[..., 0])  # the first column, top to bottom
    assert torch.equal(routes[:, 2, :, 0], x[..., -1, -1])
    torch.testing.assert_close(bench.cross_merge(routes, 4, 5), 4 * x)


def test_runs_end_to_end_and_both_ways_agree(tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--sizes", "5", "--dims", "17", "--iters", "1", "--warmup", "0",
                       "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "scan.csv")))
    assert [r["pass_"] for r in rows] == ["fwd", "fwd+bwd"] and all(float(r["speedup"]) > 0 for r in rows)
    assert (tmp_path / "scan.png").stat().st_size > 0
    assert "| 5² | 17 | fwd |" in capsys.readouterr().out


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "0"])
