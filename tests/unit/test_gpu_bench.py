"""benchmarks/gpu_bench.py's side-by-side summary: the figures the GPU run records in RESULTS.md."""
import json

from benchmarks import gpu_bench


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_summary_puts_both_sides_and_their_ratio(tmp_path, capsys):
    card = "NVIDIA H100 80GB HBM3"
    rows = [{"part": "attention", "shape": "a", "max_abs_err": 1e-3},
            {"part": "attention", "shape": "b", "max_abs_err": 4e-3},
            {"part": "train_ours", "device": card, "images_per_s": 60.0, "mfu": 0.45},
            {"part": "train_torch", "device": card, "images_per_s": 40.0, "mfu": 0.30},
            {"part": "restore_ours", "device": card, "images_per_s": 3.0},
            {"part": "restore_torch", "device": card, "images_per_s": 2.0}]
    gpu_bench.summary(write(tmp_path / "r.jsonl", rows))
    out = capsys.readouterr().out.splitlines()
    assert "train images_per_s: ours 60.00, PyTorch 40.00; ours/PyTorch 1.50x" in out
    assert "train mfu: ours 45.0%, PyTorch 30.0%; ours/PyTorch 1.50x" in out
    assert "restore images_per_s: ours 3.00, PyTorch 2.00; ours/PyTorch 1.50x" in out
    assert out[-1].endswith(f"| {card} | 60.00 / 40.00 | 45.0% / 30.0% | 3.00 / 2.00 | 0.004 (2 shapes) |")


def test_summary_marks_a_missing_side(tmp_path, capsys):
    rows = [{"part": "train_torch", "device": "H100", "images_per_s": 41.1, "mfu": 0.159}]
    gpu_bench.summary(write(tmp_path / "r.jsonl", rows))
    out = capsys.readouterr().out.splitlines()
    assert "train images_per_s: ours —, PyTorch 41.10" in out
    assert out[-1].endswith("| H100 | — / 41.10 | — / 15.9% | — / — | nan (0 shapes) |")


def test_summary_works_out_mfu_from_the_flops_part(tmp_path, capsys):
    rows = [{"part": "flops", "batch": 16, "train_flops": 6.4e13},
            {"part": "train_ours", "device": "NVIDIA H100 80GB HBM3", "batch": 16, "step_ms": 200.0,
             "images_per_s": 80.0},
            {"part": "train_torch", "device": "NVIDIA H100 80GB HBM3", "batch": 16, "step_ms": 400.0,
             "images_per_s": 40.0}]
    gpu_bench.summary(write(tmp_path / "r.jsonl", rows))
    out = capsys.readouterr().out.splitlines()
    # 6.4e13 FLOP / 0.2 s / 989e12 FLOP/s = 32.4%; PyTorch half of that
    assert "train mfu: ours 32.4%, PyTorch 16.2%; ours/PyTorch 2.00x" in out


def test_peak_flops_by_card_name():
    assert gpu_bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_bench.peak_flops("some other card") != gpu_bench.peak_flops("some other card")  # nan
