"""Configs: the pod variants scale the paper's recipe by the stated rule (config_base.scale_for_batch)."""
import math

import pytest

from diffrestorer_jax.config_base import load_config_file


def test_pod_config_scales_lr_by_sqrt_batch_and_keeps_images_seen():
    base = load_config_file("configs/sd15.py:stage1").train
    pod = load_config_file("configs/sd15.py:stage1_pod")
    t = pod.train
    assert t.batch_size == 1024 and pod.mesh.fsdp == 64 and pod.mesh.data == -1
    assert t.learning_rate == pytest.approx(base.learning_rate * math.sqrt(1024 / 16))
    assert t.num_steps * t.batch_size == pytest.approx(base.num_steps * base.batch_size, rel=1e-3)
    assert t.ema_decay == pytest.approx(base.ema_decay ** (1024 / 16), rel=1e-9)  # same horizon in images
    other = load_config_file("configs/sd15.py:stage1_pod:2048").train
    assert other.batch_size == 2048
    assert other.learning_rate == pytest.approx(base.learning_rate * math.sqrt(2048 / 16))
    s2 = load_config_file("configs/sd15.py:stage2_pod")
    assert s2.stage == "stage2" and s2.train.batch_size == 256
    assert s2.train.learning_rate == pytest.approx(1e-5 * math.sqrt(256 / 4))
    with pytest.raises(ValueError, match="stage1_pod"):
        load_config_file("configs/sd15.py:stage1:64")
