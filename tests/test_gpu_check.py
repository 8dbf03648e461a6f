"""benchmarks/gpu_check.py in its dry run: the GPU session's rows, on CPU with a tiny model.

The GPU run happens rarely and must work the first time, so the dry run runs the very same
row functions here; a row that breaks shows as FAIL in the table and fails this test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# Rows a dry run skips on purpose: the demo takes ~60 s on 2 CPU cores (tests/test_demo.py runs it).
SKIPPED_IN_DRY_RUN = {"demo"}


def gpu_check_module():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    return gpu_check


def dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if env is None:
        env = cli_env()
        env.pop("GPU_CHECK_FAIL_ROW", None)  # the test hook, set only where a test means it
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def table_statuses(stdout: str) -> dict[str, str]:
    """Row name -> status, from the markdown table at the end of the output."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[3] in ("OK", "FAIL", "SKIP"):
            rows[cells[0]] = cells[3]
    return rows


def test_every_row_of_the_dry_run_is_ok(tmp_path):
    gpu_check = gpu_check_module()
    names = [row.name for row in gpu_check.plan(gpu_check.Context(dry_run=True))]
    out = tmp_path / "rows.json"
    result = dry_run("--json", str(out))
    statuses = table_statuses(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert list(statuses) == names  # every row, in order, none missing
    for name in names:
        expected = "SKIP" if name in SKIPPED_IN_DRY_RUN else "OK"
        assert statuses[name] == expected, (name, result.stdout[-4000:])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in saved["rows"]] == names and saved["dry_run"] is True
    assert result.stdout.splitlines()[0].startswith("device: CPU")


def test_a_broken_row_is_fail_and_the_exit_status_is_1(tmp_path):
    env = cli_env()
    env["GPU_CHECK_FAIL_ROW"] = "precision 92m bf16-mixed"
    out = tmp_path / "rows.json"
    result = dry_run("--only", "precision", "--json", str(out), env=env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    statuses = table_statuses(result.stdout)
    assert statuses["precision 92m bf16-mixed"] == "FAIL"
    # The others still ran, and only the precision rows did (--only).
    assert set(statuses) == {f"precision {p} {q}" for p in ("43m", "92m")
                             for q in ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed")}
    assert sum(s == "OK" for s in statuses.values()) == 7
    rows = {r["name"]: r for r in json.loads(out.read_text(encoding="utf-8"))["rows"]}
    assert "forced failure" in rows["precision 92m bf16-mixed"]["result"]


def test_an_unknown_only_name_is_a_usage_error():
    result = dry_run("--only", "precission")
    assert result.returncode == 2 and "no such check or row" in result.stderr


def test_the_demo_row_reads_the_final_numbers_the_demo_prints():
    gpu_check = gpu_check_module()
    stdout = "\n".join([
        "=== 3/6 pretrain: 0.75 minutes of 32 x 512 tokens per step on cuda:0 ===",
        "step 500: val loss 5.644  ppl 282.6  acc 13.6%  bpc 6.559",
        "step 2211: val loss 4.836  ppl 126.0  acc 20.7%  bpc 5.620",
        "=== 4/6 sft: builtin:chatterbot-zh@8 + builtin:reviews-zh#train, chatml template ===",
        "step 1348: val loss 4.296  ppl 73.4  acc 29.3%  bpc 4.950",
        "=== 5/6 skill check on held-out reviews (neither pretraining nor SFT saw them) ===",
        "| part | n | accuracy | 好评 | 差评 | baseline | unparsed | loop rate |",
        "| classification (greedy) | 326 | 0.8160 | 0.7671 | 0.8556 | 0.5521 | 0.0000 | 0.0000 |",
        "| written reviews, judged (sampled) | 112 | 0.7857 | 0.9286 | 0.6429 | 0.5000 |  | 0.0000 |",
        "done in 9.4 minutes",
    ])
    summary = gpu_check.demo_summary(stdout)
    assert summary == {"pretrain": {"step": 2211, "val_loss": 4.836, "val_bpc": 5.62},
                       "sft": {"step": 1348, "val_loss": 4.296, "val_bpc": 4.95},
                       "classification": 0.816, "written": 0.7857, "minutes": 9.4}
    assert gpu_check.demo_result(summary).startswith("pretrain 2,211 steps, val bpc 5.620; SFT 1,348 steps")
    with pytest.raises(ValueError, match="no pretraining evaluation"):
        gpu_check.demo_summary("=== 3/6 pretrain ===\nTraceback ...")


def test_known_gpu_peaks_match_the_longest_name_first():
    gpu_check = gpu_check_module()

    def peak(name):
        return next(p for key, p in gpu_check.KNOWN_PEAKS if key in name)

    assert peak("NVIDIA H200") == 989e12 and peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA L40S") == 362e12 and peak("NVIDIA L4") == 121e12
    assert peak("NVIDIA GeForce RTX 4090") == 165e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12


def test_the_500m_model_has_about_500m_parameters():
    gpu_check = gpu_check_module()
    import torch

    cfg = gpu_check.load_config("92m", {"model": gpu_check.M500_MODEL})
    with torch.device("meta"):  # shapes only: no 2 GB of weights
        model = gpu_check.Llama(cfg.model)
    assert 480e6 < model.parameter_counts()["total"] < 560e6


def test_the_script_is_in_the_makefile():
    assert "gpu-check:" in (REPO / "Makefile").read_text(encoding="utf-8")

