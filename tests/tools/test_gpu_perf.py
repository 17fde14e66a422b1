"""tools/gpu_perf.py (the GPU A/B script's Python part) runs its CPU dry run and records what it promises."""

import json

from qwen25vl.tools import gpu_perf


def test_cpu_dry_run_records_each_variant(tmp_path):
    rc = gpu_perf.main(
        [
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--out",
            str(tmp_path),
            "--parts",
            "decode,vision",
            "--variants",
            "sdpa,split,fused",
            "--decode-tokens",
            "3",
            "--vision-reps",
            "1",
        ]
    )
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "perf.jsonl").read_text().splitlines()]
    decode = {r["variant"]: r for r in recs if r.get("what") == "decode.b1"}
    assert set(decode) == {"sdpa", "split", "fused"}
    assert all(r["tokens_equal_baseline"] and r["n"] == 4 for r in decode.values())
    assert decode["fused"]["decode_attention"] == "sdpa" and decode["split"]["decode_attention"] == "split"
    checks = [r for r in recs if r.get("what") in ("decode_attention.check", "gemv.check")]
    assert checks and all(r["ok"] for r in checks)
    assert {r["part"] for r in recs if "part" in r} == {"decode", "vision"} and all(
        r["ok"] for r in recs if "part" in r
    )
    assert "| decode.b1" in (tmp_path / "summary.md").read_text()
