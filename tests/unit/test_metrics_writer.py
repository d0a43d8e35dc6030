"""The training console: log lines printed while the progress bar is up start on a line of their own."""
import io
import re
import sys

from diffrestorer_jax.train.metrics_writer import MetricsWriter


def test_step_lines_are_not_printed_into_the_progress_bar(tmp_path, monkeypatch):
    console = io.StringIO()  # stdout and stderr on one terminal (or one log file)
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", console)
    writer = MetricsWriter(str(tmp_path / "tb"), total_steps=10, enabled=True)
    writer.advance()
    writer.print("step 1 loss=0.5")
    writer.advance()
    writer.close()
    shown = re.split(r"[\r\n]", console.getvalue())  # what a terminal shows, line by line
    assert "step 1 loss=0.5" in shown
    assert any(line.startswith("train:") and "2/10" in line for line in shown)


def test_other_processes_print_plainly(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path / "tb"), total_steps=10, enabled=False)
    writer.print("step 1 loss=0.5")
    assert capsys.readouterr().out == "step 1 loss=0.5\n"
