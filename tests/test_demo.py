"""The README's demo at toy size on the real data (Fashion-MNIST from Debian's package; .ci/run installs it)."""

import re

import pytest
from typer.testing import CliRunner

from retrogen.cli import app
from retrogen.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")


def test_fashion_mnist_loader_reads_real_idx_files():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert set(y.tolist()) == set(range(10))


def test_demo_runs_end_to_end_and_retrieves_mostly_the_right_classes(tmp_path, onnx_cache_dir):
    res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--pool-size", "400", "--shots", "3",
                                   "--per-class", "4", "--test-size", "100"])
    assert res.exit_code == 0, res.output
    m = re.search(r"^all\s+(\d+)\s+([\d.]+)", res.output, re.M)
    assert m, res.output
    retrieved, purity = int(m.group(1)), float(m.group(2))
    assert retrieved == 40
    # real pretrained features on real data: neighbours are far purer than chance (0.10)
    assert purity > 0.5, res.output
    assert "linear probe" in res.output
    assert (tmp_path / "retrieved" / "provenance.jsonl").exists()
