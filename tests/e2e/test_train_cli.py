"""diffrestorer-train's own stops: too many non-finite updates in a row end the run with exit status 2
and a message naming the config key, no traceback (a tiny VAE step, the cheapest to compile); an
init_from export of another model config, and given weights or a workdir that cannot be used, are
refused the same way, before anything is compiled."""
import pathlib
import re

import pytest

import procs
from exports import tiny_export


def refused(tmp_path, args, workdir=None) -> str:
    """Run diffrestorer-train on a tiny prior_vae config with `args`; its output, once it has ended
    with exit status 2 and no traceback."""
    worker = procs.Worker(
        procs.command("diffrestorer-train"),
        ["--config", "configs/tiny.py:prior_vae", "--workdir", workdir or tmp_path / "run", "--fast_compile",
         "--config.data.kind=skimage", *args],
        procs.worker_env(1), str(tmp_path / "log.txt"))
    try:
        assert worker.wait(900) == 2, worker.output()[-3000:]
    finally:
        worker.kill()
    out = worker.output()
    # The only tracebacks allowed: Orbax's reads still in flight when a restore of a damaged export
    # failed, finishing on its closed event loop (printed by their threads, not by the command).
    late_reads = out.count("RuntimeError: Event loop is closed")
    assert out.count("Traceback (most recent call last)") == late_reads, out[-3000:]
    assert all(f.endswith("asyncio/base_events.py") for f in re.findall(r'File "([^"]+)"', out)), out[-3000:]
    return out


def test_non_finite_streak_stops_the_command(tmp_path):
    out = refused(tmp_path, [
        "--config.image_size=16", "--config.train.batch_size=2",
        "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
        "--config.train.clip_grad_norm=0", "--config.train.max_consecutive_skips=2",
        "--config.train.log_every=1", "--config.train.num_steps=20"])
    assert "updates in a row had non-finite gradients" in out and "config.train.max_consecutive_skips" in out
    assert "training done" not in out and not (tmp_path / "run" / "export").exists()


def test_export_of_another_model_config_is_refused_without_a_traceback(tmp_path):
    out = refused(tmp_path, [f"--config.weights.init_from={tiny_export(tmp_path / 'export')}",
                             "--config.model.decoder.rdb_growth=16"])
    assert "given 'decoder' param fusions_0/rdb/conv1/kernel has shape" in out, out[-3000:]
    assert "same --config.model.* overrides" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def _damaged_export(tmp_path: pathlib.Path) -> str:
    """A tiny export that lost its largest parameter data file (an interrupted copy, say)."""
    export = pathlib.Path(tiny_export(tmp_path / "export"))
    data = [p for p in (export / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    max(data, key=lambda p: p.stat().st_size).unlink()
    return str(export)


@pytest.mark.parametrize("case", ["init_trained alone", "weights.clip missing", "init_from damaged",
                                  "workdir a file"])
def test_weights_and_workdirs_that_cannot_be_used_are_one_message(tmp_path, case):
    workdir = None
    if case == "init_trained alone":
        args, expected = ["--config.weights.init_trained=True"], "weights.init_trained=True needs weights.init_from"
    elif case == "weights.clip missing":
        args, expected = [f"--config.weights.clip={tmp_path / 'clipp'}"], "weights.clip: "
    elif case == "init_from damaged":
        args, expected = [f"--config.weights.init_from={_damaged_export(tmp_path)}"], "cannot load the export"
    else:
        workdir = tmp_path / "notes.txt"
        workdir.write_text("a file, not a folder")
        args, expected = [], "exists and is not a folder"
    out = refused(tmp_path, args, workdir)
    assert expected in out, out[-3000:]
    assert not (tmp_path / "run").exists()
