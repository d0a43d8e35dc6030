"""The CPU backend setting the commands put into XLA_FLAGS (diffrestorer_jax/xla_cpu.py), and that
importing the package leaves XLA_FLAGS alone."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from diffrestorer_jax.xla_cpu import (CPU_TREE_REDUCTION_PASS, DISABLE_PASSES_FLAG, YNN_FLAG, YNN_MATMULS_ONLY,
                                      set_cpu_defaults, tree_reduction_pass_disabled)


def test_the_flags_are_added_once_and_a_users_choice_wins():
    ynn = f"--{YNN_FLAG}={YNN_MATMULS_ONLY}"
    tree = f"--{DISABLE_PASSES_FLAG}={CPU_TREE_REDUCTION_PASS}"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert set_cpu_defaults(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {ynn}"  # no pass left out
    assert not set_cpu_defaults(env)  # already there: unchanged
    assert set_cpu_defaults(env, restore=True)  # a restoring command leaves out the tree rewriter too
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {ynn} {tree}"
    assert not set_cpu_defaults(env, restore=True)
    assert env["XLA_FLAGS"].count(YNN_FLAG) == 1 and env["XLA_FLAGS"].count(DISABLE_PASSES_FLAG) == 1
    mine = {"XLA_FLAGS": f"--{YNN_FLAG}="}  # the user's YNNPACK choice stays; the other flag is added
    assert not set_cpu_defaults(mine) and mine["XLA_FLAGS"] == f"--{YNN_FLAG}="
    assert set_cpu_defaults(mine, restore=True) and mine["XLA_FLAGS"] == f"--{YNN_FLAG}= {tree}"
    passes = {"XLA_FLAGS": f"--{DISABLE_PASSES_FLAG}=cse"}  # a user's own pass list is left alone
    assert set_cpu_defaults(passes, restore=True) and passes["XLA_FLAGS"] == f"--{DISABLE_PASSES_FLAG}=cse {ynn}"
    empty = {}
    assert set_cpu_defaults(empty) and empty["XLA_FLAGS"] == ynn
    off = {"DIFFRESTORER_XLA_CPU_DEFAULTS": "0"}
    assert not set_cpu_defaults(off, restore=True) and "XLA_FLAGS" not in off


def test_tree_reduction_pass_disabled_reads_xla_flags():
    """What models/group_norm.py asks before building its own reduction trees."""
    restore, train = {}, {}
    set_cpu_defaults(restore, restore=True)
    set_cpu_defaults(train)
    assert tree_reduction_pass_disabled(restore) and not tree_reduction_pass_disabled(train)
    assert tree_reduction_pass_disabled({"XLA_FLAGS": f"-{DISABLE_PASSES_FLAG}=cse,{CPU_TREE_REDUCTION_PASS}"})
    assert not tree_reduction_pass_disabled({"XLA_FLAGS": f"--{DISABLE_PASSES_FLAG}=cse"})
    assert not tree_reduction_pass_disabled({"XLA_FLAGS": f"--{DISABLE_PASSES_FLAG}=tree-reduction-rewriter"})
    assert not tree_reduction_pass_disabled({})


def test_this_process_compiles_convolutions_with_xla_itself():
    assert YNN_FLAG in os.environ["XLA_FLAGS"]
    x = jnp.ones((1, 16, 16, 32))
    w = jnp.ones((3, 3, 32, 32))
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    hlo = conv.lower(x, w).compile().as_text()
    assert "convolution(" in hlo and "ynn_fusion" not in hlo  # XLA's default makes it a ynn_fusion


def test_the_restore_flag_names_a_pass_this_xla_runs():
    """Leaving out the pass the restoring commands name keeps a softmax over 256 keys (the tiny UNet's
    attention) as plain reductions; XLA CPU's default pipeline makes reduce-window trees of them. Fails
    if a jaxlib renames the pass (the flag would then silently do nothing)."""
    x = jnp.ones((4, 4, 256, 256))
    softmax = jax.jit(lambda x: jax.nn.softmax(x, axis=-1)).lower(x)
    assert "reduce-window" in softmax.compile().as_text()
    hlo = softmax.compile(compiler_options={DISABLE_PASSES_FLAG: CPU_TREE_REDUCTION_PASS}).as_text()
    assert "reduce(" in hlo and "reduce-window" not in hlo


def test_importing_the_package_changes_no_flags():
    """Only the commands (and programs that ask) set XLA_FLAGS: importing every library module (the
    commands' own modules define their absl flags, so they are imported one per process) leaves it be."""
    code = ("import os, pkgutil, importlib, diffrestorer_jax as p\n"
            "for m in pkgutil.walk_packages(p.__path__, 'diffrestorer_jax.'):\n"
            "    if '.cli.' not in m.name: importlib.import_module(m.name)\n"
            "print(repr(os.environ.get('XLA_FLAGS')))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "None"


def test_prepare_process_sets_the_backend_level_unless_given(monkeypatch):
    from diffrestorer_jax.cli import startup
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    startup.prepare_process(backend_optimization_level=1)
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_backend_optimization_level=1" in flags and "--xla_force_host_platform_device_count=2" in flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    startup.prepare_process(backend_optimization_level=0)  # the user's own setting wins
    flags = os.environ["XLA_FLAGS"]
    assert flags.count("xla_backend_optimization_level") == 1 and "--xla_backend_optimization_level=3" in flags
    monkeypatch.setenv("XLA_FLAGS", "")
    startup.prepare_process()
    assert "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]
    assert CPU_TREE_REDUCTION_PASS not in os.environ["XLA_FLAGS"]
    startup.prepare_process(restore=True)
    assert f"--{DISABLE_PASSES_FLAG}={CPU_TREE_REDUCTION_PASS}" in os.environ["XLA_FLAGS"]


def test_the_restoring_commands_ask_for_the_restore_setting(monkeypatch, tmp_path):
    """restore, evaluate, app and demo prepare their process with restore=True (train does not: it
    would change training's rounding); each stops at that call here, before any work."""
    import importlib
    from diffrestorer_jax.cli import startup

    class Stop(Exception):
        pass

    seen = {}

    def record(*args, restore=False, **kwargs):
        seen["restore"] = restore
        raise Stop

    monkeypatch.setattr(startup, "prepare_process", record)
    argv = {"restore": ["--checkpoint", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o")],
            "evaluate": ["--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")],
            "app": ["--checkpoint", str(tmp_path)], "demo": ["--out", str(tmp_path / "o")]}
    for name, args in argv.items():
        seen.clear()
        module = importlib.import_module(f"diffrestorer_jax.cli.{name}")
        try:
            module.main(args)
        except Stop:
            pass
        assert seen == {"restore": True}, name
