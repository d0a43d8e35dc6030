"""diffrestorer-train's own stops: too many non-finite updates in a row end the run with exit status 2
and a message naming the config key, no traceback (a tiny VAE step, the cheapest to compile); an
init_from export of another model config is refused the same way, before anything is compiled."""
import procs
from exports import tiny_export


def refused(tmp_path, args) -> str:
    """Run diffrestorer-train on a tiny prior_vae config with `args`; its output, once it has ended
    with exit status 2 and no traceback."""
    worker = procs.Worker(
        procs.command("diffrestorer-train"),
        ["--config", "configs/tiny.py:prior_vae", "--workdir", tmp_path / "run", "--fast_compile",
         "--config.data.kind=skimage", *args],
        procs.worker_env(1), str(tmp_path / "log.txt"))
    try:
        assert worker.wait(900) == 2, worker.output()[-3000:]
    finally:
        worker.kill()
    out = worker.output()
    assert "Traceback" not in out, out[-3000:]
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
