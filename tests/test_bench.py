"""The benchmark harness runs end to end (a smoke test: it checks the harness, never a speed)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import throughput  # noqa: E402


def test_throughput_harness_smoke(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = throughput.main(["--device", "cpu", "--models", "resnet8", "--data", str(tiny_tree), "--warmup", "1",
                              "--steps", "1", "--repeats", "2", "--loader-batches", "1", "--eval-batch", "20",
                              "--setups", "0,1,3,6", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["baseline (DataLoader, eager fp32)"]["speedup"] == 1.0
    for name in ("fastres eager fp32", "+ amp"):
        assert rows[name]["it_s"] > 0 and len(rows[name]["repeats"]) == 2 and rows[name]["eval_img_s"] > 0
    assert "skipped" in rows["+ compile, CPU loader"]  # no GPU: the host loader is the torch loader
    assert result["versions"]["torch"] and result["device"]
    assert all(isinstance(v, str) or v > 0 for v in result["loaders"].values())

