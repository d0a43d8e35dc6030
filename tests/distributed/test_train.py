"""Training at scale, in process on 8 fake CPU devices (tiny config, 32x32 crops).

One module-scoped setup per mesh (a `train.run.Run`: plan, sharded init, the step compiled once), shared
by every test: a (2, 4) data x fsdp run against a one-device run (same losses and params after 3
steps), partition specs, compile-once over >= 5 steps including after an Orbax restore, restore of
the (2, 4) checkpoint onto (8, 1) and one device, non-finite skipping, and learning (stage-1 loss
falls and the classifier beats chance; stage-2 loss falls).
Batches are paired (LQ degraded once up front by `data.degradations`), so the step programs do not
recompile the eight degradation ops; the synthetic path (`degrade` inside the step) is exercised by
test_train_faults.py through the CLI.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from configs import tiny
from diffrestorer_jax.data import degradations, sources
from diffrestorer_jax.diffusion.schedules import from_config
from diffrestorer_jax.parallel.sharding import CompileCounter
from diffrestorer_jax.train import optim
from diffrestorer_jax.train.run import FAST_COMPILE, Run
from diffrestorer_jax.train import state as st
from diffrestorer_jax.train.checkpoint import Checkpointer

FAST = FAST_COMPILE
BATCH, SIZE = 8, 32


def small_config(stage="stage1", mesh=(1, 1)):
    c = tiny.get_config(stage)
    c.image_size = SIZE
    c.model.clip.image_size = SIZE
    c.model.discriminator = dict(base_channels=8, n_layers=2)
    c.train.batch_size = BATCH
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 2
    c.train.classifier_weight = 1.0
    c.train.gan_start_step = 4
    c.data.kind = "skimage"
    c.mesh = dict(data=mesh[0], fsdp=mesh[1], tensor=1)
    return c


def Counter():
    """Compilations of the train step itself (small helper ops such as array creation also compile;
    they are not what "the step compiles once" is about)."""
    return CompileCounter("jit(step)")


@pytest.fixture(scope="module")
def pool():
    """64 paired examples: 8 crops of the photos x the 8 types, degraded once."""
    c = small_config()
    src = sources.StepIndexedImages(sources.load_training_images(c), 64, SIZE, seed=1)
    hq = src.batch(0)["hq"]
    types = np.arange(64, dtype=np.int32) % degradations.NUM_TYPES
    fn = degradations.make_degrade_fn(degradations.default_degradation_config())
    lq, labels = fn(jax.random.key(3), jnp.asarray(hq), jnp.asarray(types))
    return {"hq": hq, "lq": np.asarray(lq), "type_id": np.asarray(labels["type_id"])}


def paired_batch(pool, step):
    idx = np.random.default_rng([7, step]).choice(len(pool["hq"]), BATCH, replace=False)
    return {"hq": pool["hq"][idx], "lq": pool["lq"][idx], "type_id": pool["type_id"][idx],
            "index": (step * BATCH + np.arange(BATCH)).astype(np.int32)}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def one_device(pool, tmp_path_factory):
    run = Run(small_config(), jax.devices()[:1], FAST)
    state, frozen = run.init()
    init = host(state)
    losses = []
    for s in range(3):
        state, m = run.step(state, frozen, paired_batch(pool, s))
        losses.append(float(m["loss"]))
    return dict(run=run, state=state, frozen=frozen, init=init, losses=losses)


@pytest.fixture(scope="module")
def mesh_run(pool, tmp_path_factory):
    """(2, 4) run: compile + 5 steps, checkpoint, restore, 3 more steps; compile counts recorded."""
    workdir = tmp_path_factory.mktemp("mesh")
    run = Run(small_config(mesh=(2, 4)), None, FAST)
    state, frozen = run.init()
    init = host(state)
    losses = []
    with Counter() as first:
        run.compile(paired_batch(pool, 0))
        for s in range(5):
            state, m = run.step(state, frozen, paired_batch(pool, s))
            losses.append(float(m["loss"]))
            if s == 2:
                after3 = host(state.params)
    ckpt = Checkpointer(str(workdir / "ckpt"), save_every=1, keep=2)
    ckpt.save(5, state, run.config, {"step": 5})
    ckpt.wait()
    saved = host(state)
    restored, config_json, data_state = ckpt.restore(run.plan.state_target)
    ckpt.close()
    with Counter() as second:
        for s in range(5, 8):
            restored, m = run.step(restored, frozen, paired_batch(pool, s))
    return dict(run=run, init=init, losses=losses, after3=after3, saved=saved, first=first.count,
                second=second.count, data_state=data_state, config_json=config_json,
                ckpt_dir=str(workdir / "ckpt"), final_step=int(restored.step))


def test_mesh_equals_one_device(one_device, mesh_run):
    np.testing.assert_array_equal(jax.tree.leaves(one_device["init"].params)[0],
                                  jax.tree.leaves(mesh_run["init"].params)[0])
    np.testing.assert_allclose(mesh_run["losses"][:3], one_device["losses"], rtol=1e-5, atol=1e-6)
    # Params: Adam divides each gradient by its own RMS, so for an element whose gradient is ~0 a
    # float32 reduction-order difference becomes a visible fraction of one step (lr = 3e-3): the
    # bound is 1e-4 absolute (3% of one step), far below any real sharding bug (whole steps off).
    ref = host(one_device["state"].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), mesh_run["after3"], ref)


def test_partition_specs_follow_rules(mesh_run):
    plan = mesh_run["run"].plan
    P = jax.sharding.PartitionSpec
    checked = 0
    for tree in (plan.frozen_shardings["unet"], plan.state_shardings.params["control"]):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        target = (plan.frozen_target["unet"] if tree is plan.frozen_shardings["unet"]
                  else plan.state_target.params["control"])
        shapes = {path: x.shape for path, x in jax.tree_util.tree_flatten_with_path(target)[0]}
        for path, sh in flat:
            name = jax.tree_util.keystr(path)
            shape = shapes[path]
            if name.endswith("['kernel']") and len(shape) == 4 and shape[2] % 4 == 0:
                assert sh.spec == P(None, None, "fsdp", "tensor"), (name, sh.spec)
                checked += 1
            if name.endswith("['kernel']") and len(shape) == 2 and shape[0] % 4 == 0 and "to_q" in name:
                assert sh.spec[0] == "fsdp", (name, sh.spec)
                checked += 1
    assert checked > 20
    # Adam moments live where their params do.
    mu = optim.optax.tree_utils.tree_get(plan.state_shardings.opt_state, "mu")
    assert jax.tree.leaves(mu)[0] == jax.tree.leaves(plan.state_shardings.params)[0]


def test_compiles_once_including_after_restore(mesh_run):
    assert mesh_run["first"] == 1, "compile + 5 steps should obtain exactly one XLA program"
    assert mesh_run["second"] == 0, "steps after an Orbax restore must not recompile"
    assert mesh_run["final_step"] == 8
    assert mesh_run["data_state"] == {"step": 5}


@pytest.mark.parametrize("mesh", [(8, 1), None])
def test_checkpoint_restores_on_other_meshes(mesh_run, one_device, mesh):
    if mesh is None:
        plan = one_device["run"].plan
    else:
        c = small_config(mesh=mesh)
        run = mesh_run["run"]
        from diffrestorer_jax.parallel import mesh as mesh_lib
        m = mesh_lib.make_mesh(c.mesh)
        plan = st.StatePlan(run.nets, run.tx, c, m, run.rules, {})
    with Checkpointer(mesh_run["ckpt_dir"]) as ckpt:
        restored, _, _ = ckpt.restore(plan.state_target)
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.mesh.devices.size == (8 if mesh else 1)
    jax.tree.map(np.testing.assert_array_equal, host(restored), mesh_run["saved"])


def test_nonfinite_update_is_skipped(one_device, pool):
    run = one_device["run"]
    state = one_device["state"]
    before = host(state.params)
    bad = paired_batch(pool, 100)
    bad["hq"] = np.full_like(bad["hq"], np.nan)
    state, m = run.step(state, one_device["frozen"], bad)
    assert int(m["skipped"]) == 1 and int(m["nonfinite_streak"]) == 1
    jax.tree.map(np.testing.assert_array_equal, host(state.params), before)
    with pytest.raises(FloatingPointError, match="in a row"):
        optim.check_nonfinite_streak(state.opt_state, 1, step=int(state.step))
    one_device["state"] = state  # later tests continue from here (a finite step resets the streak)


def test_stage1_learns(one_device, pool):
    run, state, frozen = one_device["run"], one_device["state"], one_device["frozen"]
    hist = []
    for s in range(200, 240):
        state, m = run.step(state, frozen, paired_batch(pool, s))
        hist.append(host(m))
    loss = [h["loss"] for h in hist]
    acc = [h["accuracy"] for h in hist]
    assert int(hist[-1]["nonfinite_streak"]) == 0
    assert np.mean(loss[-8:]) < np.mean(loss[:8]), loss
    assert np.mean(acc[-10:]) > 1.0 / 8 + 0.15, acc


def test_prior_clip_trains_the_tower_and_classifier_to_name_the_type(pool, tmp_path):
    """prior_clip (the demo's stand-in for CLIP pretraining): CLIP and the prompt processor are the
    trained networks, on cross-entropy alone; the classifier beats chance on the paired crops, and a
    stage-1 run given the export keeps the trained tower frozen, its prompt processor fresh."""
    c = small_config("prior_clip")
    c.train.learning_rate = 1e-3
    run = Run(c, jax.devices()[:1], FAST)
    assert sorted(run.plan.state_target.params) == ["clip", "prompt"]
    state, frozen = run.init()
    init = host(state.params)
    hist = []
    for s in range(60):
        state, m = run.step(state, frozen, paired_batch(pool, s))
        hist.append(host(m))
    ce, acc = [h["ce"] for h in hist], [h["accuracy"] for h in hist]
    np.testing.assert_allclose([h["loss"] for h in hist], ce, rtol=1e-6)
    assert np.mean(ce[-10:]) < np.mean(ce[:10]) - 0.2, ce
    assert np.mean(acc[-20:]) > 1.0 / 8 + 0.15, acc
    moved = host(state.params)
    from flax import traverse_util
    for name in ("clip", "prompt"):  # every parameter array the logits depend on is trained
        before, after = traverse_util.flatten_dict(init[name]), traverse_util.flatten_dict(moved[name])
        still = sorted("/".join(k) for k in before if np.array_equal(before[k], after[k]))
        # not CLIP's post-LN (the prompts read the tokens before it) nor P_S's head (the logits pool
        # P_D); their scales and kernels move by weight decay alone
        assert all(k.startswith("post_layernorm/" if name == "clip" else "semantic_") for k in still), still

    from diffrestorer_jax.export import save_export
    save_export(str(tmp_path / "export"), run.export_params(state, frozen), c)
    c1 = small_config("stage1")
    c1.weights.init_from = str(tmp_path / "export")
    s1_state, s1_frozen = Run(c1, jax.devices()[:1], FAST).init()
    jax.tree.map(np.testing.assert_array_equal, host(s1_frozen["clip"]), host(state.ema["clip"]))
    # the same seed's random init as prior_clip started from, not its trained heads
    jax.tree.map(np.testing.assert_array_equal, host(s1_state.params["prompt"]), init["prompt"])


@pytest.mark.parametrize("pixel_loss,sample_steps", [("l1", 0), ("psnr", 2)])
def test_stage2_learns(pool, tmp_path, pixel_loss, sample_steps):
    """sample_steps > 0: the decoder's predicted latents are DDIM samples (train.decoder_sample_steps).
    Two cases cover both pixel losses and both kinds of latents (each compiles a stage-2 step, the
    suite's slowest kind of test: psnr with VAE latents would add ~3 minutes and nothing new)."""
    c = small_config("stage2")
    c.train.decoder_pixel_loss = pixel_loss
    c.train.decoder_sample_steps = sample_steps
    run = Run(c, jax.devices()[:1], FAST)
    state, frozen = run.init()
    hist = []
    for s in range(16):
        state, m = run.step(state, frozen, paired_batch(pool, s))
        hist.append(host(m))
    l1 = [h["l1"] for h in hist]  # logged for either pixel loss
    if pixel_loss == "psnr":  # before the GAN starts, the loss is the PSNR term alone
        off = [h for h in hist if not h["gan_on"]]
        np.testing.assert_allclose([h["loss"] for h in off], [h["psnr"] for h in off], rtol=1e-6)
    assert [h["gan_on"] for h in hist][:5] == [0, 0, 0, 0, 1]
    assert np.isfinite(hist[-1]["gan_d"])
    assert np.mean(l1[-4:]) < np.mean(l1[:4]), l1


def test_stage2_whose_gan_never_starts_leaves_the_discriminator_out(pool):
    """gan_start_step >= num_steps: no discriminator in the program (fewer FLOPs), and the same
    parameters as a run whose GAN has not started yet."""
    flops, params, metrics = [], [], []
    for gan_start in (1000, 2000):  # in the program but off / never in it
        c = small_config("stage2")
        c.train.num_steps, c.train.gan_start_step = 2000, gan_start
        run = Run(c, jax.devices()[:1], FAST)
        cost = run.compile(paired_batch(pool, 0)).cost_analysis()
        flops.append((cost[0] if isinstance(cost, list) else cost)["flops"])
        state, frozen = run.init()
        for s in range(3):
            state, m = run.step(state, frozen, paired_batch(pool, s))
        params.append(host(state))
        metrics.append(host(m))
    assert flops[1] < flops[0], flops  # this test's discriminator is small: 1% of the FLOPs here
    assert "gan_d" in metrics[0] and "gan_d" not in metrics[1]
    assert metrics[0]["l1"] == metrics[1]["l1"]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(a, b)


def test_stage2_rejects_unknown_decoder_latents():
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.train import stage2
    c = small_config("stage2")
    c.train.decoder_latents = "sampled"
    with pytest.raises(ValueError, match="decoder_latents='sampled'"):
        stage2.make_step(dr.build_networks(c.model), c, None, from_config(c.diffusion), None, None, lpips=())


def test_stage2_psnr_pixel_loss_is_minus_mean_psnr_over_ten():
    """'psnr' weighs images by their own error: it is -PSNR/10 averaged over images, not over pixels."""
    from diffrestorer_jax.metrics.psnr_ssim import psnr
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.train import stage2
    rng = np.random.default_rng(0)
    hq = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
    image = np.clip(hq + rng.normal(size=hq.shape) * np.array([0.01, 0.2])[:, None, None, None], 0, 1)
    image = image.astype(np.float32)
    want = -np.mean([float(psnr(image[i], hq[i])) for i in range(2)]) / 10
    np.testing.assert_allclose(float(stage2.pixel_loss(image, hq, "psnr")), want, rtol=1e-5)
    np.testing.assert_allclose(float(stage2.pixel_loss(image, hq, "l1")), np.mean(np.abs(image - hq)), rtol=1e-6)
    c = small_config("stage2")
    c.train.decoder_pixel_loss = "l2"
    with pytest.raises(ValueError, match="decoder_pixel_loss='l2'"):
        stage2.make_step(dr.build_networks(c.model), c, None, from_config(c.diffusion), None, None, lpips=())


def test_stage2_sampled_latents_are_the_inference_samplers():
    """With train.decoder_sample_steps the decoder trains on the latents inference hands it: each row
    of the batched training sample equals the restore pipeline's per-image DDIM run from that noise."""
    from diffrestorer_jax.diffusion.samplers import sample
    from diffrestorer_jax.infer import pipeline
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.train import stage2
    c = small_config("stage2")
    nets = dr.build_networks(c.model)
    params = dr.init_params(nets, jax.random.PRNGKey(3), c.image_size)
    schedule = from_config(c.diffusion)
    rng = np.random.default_rng(0)
    lq = jnp.asarray(rng.uniform(size=(2, c.image_size, c.image_size, 3)), jnp.float32)
    prompts = dr.visual_prompts(nets, params["prompt"], dr.clip_tokens(nets, params["clip"], lq))
    f = nets.vae_factor
    noise = jax.random.normal(jax.random.PRNGKey(1), (2, c.image_size // f, c.image_size // f,
                                                      nets.latent_channels))
    got = stage2.sampled_latents(nets, params, schedule, prompts, lq, noise, 3)
    settings, knobs = pipeline.RestoreSettings(steps=3), pipeline.Knobs()
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in prompts.items()}
        model_fn = pipeline.denoiser(nets, params, one, lq[i:i + 1], knobs, settings)
        want = sample(model_fn, noise[i:i + 1], jax.random.PRNGKey(0), schedule, sampler="ddim", num_steps=3)
        np.testing.assert_allclose(np.asarray(got[i:i + 1]), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(got - noise))) > 0.1  # the sampler moved the latent


def test_stage2_rejects_negative_sample_steps():
    c = small_config("stage2")
    c.train.decoder_sample_steps = -1
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.train import stage2
    with pytest.raises(ValueError, match="decoder_sample_steps=-1"):
        stage2.make_step(dr.build_networks(c.model), c, None, from_config(c.diffusion), None, None, lpips=())


def test_stage2_prompt_shuffle_swaps_whole_prompts_with_the_asked_probability():
    """train.decoder_prompt_shuffle_prob: a swapped example gets its neighbour's degradation prompt,
    whole; the others keep theirs; 0 keeps every prompt, 1 swaps every one."""
    from diffrestorer_jax.train import stage2
    n = 2000
    p_d = jnp.arange(n, dtype=jnp.float32)[:, None, None] * jnp.ones((1, 3, 5))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    got = np.asarray(stage2.shuffled_prompts(p_d, keys, 0.3))
    swapped = got[:, 0, 0] != np.arange(n)
    np.testing.assert_array_equal(got[swapped], np.asarray(jnp.roll(p_d, 1, axis=0))[swapped])
    np.testing.assert_array_equal(got[~swapped], np.asarray(p_d)[~swapped])
    assert 0.26 < swapped.mean() < 0.34, swapped.mean()
    np.testing.assert_array_equal(np.asarray(stage2.shuffled_prompts(p_d, keys, 0.0)), np.asarray(p_d))
    np.testing.assert_array_equal(np.asarray(stage2.shuffled_prompts(p_d, keys, 1.0)),
                                  np.asarray(jnp.roll(p_d, 1, axis=0)))


def test_step_keys_are_a_prefix_whatever_the_count():
    """The per-example options (hq_levels, degrade_size, the prompt shuffle) take keys after the
    step's own: asking for more keys must not change the first ones, so a run with an option on draws
    the same noise, timesteps and crops as one without it."""
    import types
    state = types.SimpleNamespace(rng=jax.random.PRNGKey(7), step=jnp.asarray(12))
    ids = jnp.arange(4)
    few, more = st.step_keys(state, ids, 5), st.step_keys(state, ids, 8)
    for a, b in zip(few, more[:5]):  # raw uint32 keys [B, 2]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(few[0]), np.asarray(few[1]))


def test_stage2_prompt_shuffle_reaches_the_decoder_only(pool, monkeypatch):
    """With the option on, the sampler still gets each example's own degradation prompt and the
    decoder its neighbour's (probability 1 here: every one swapped); read out of the compiled step."""
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.train import stage2
    c = small_config("stage2")
    c.train.decoder_latents, c.train.decoder_sample_steps = "predicted", 1
    c.train.decoder_prompt_shuffle_prob = 1.0
    seen, real_sample, real_decode = {}, stage2.sampled_latents, dr.decode

    def keep(name):
        return lambda x: seen.__setitem__(name, np.asarray(x))

    def sample(nets, frozen, schedule, prompts, *args, **kwargs):
        jax.debug.callback(keep("sampler"), prompts["degradation"])
        return real_sample(nets, frozen, schedule, prompts, *args, **kwargs)

    def decode(nets, params, z0, features, prompts, *args, **kwargs):
        jax.debug.callback(keep("decoder"), prompts["degradation"])
        return real_decode(nets, params, z0, features, prompts, *args, **kwargs)
    monkeypatch.setattr(stage2, "sampled_latents", sample)
    monkeypatch.setattr(dr, "decode", decode)
    run = Run(c, jax.devices()[:1], FAST)
    state, frozen = run.init()
    jax.block_until_ready(run.step(state, frozen, paired_batch(pool, 0)))
    jax.effects_barrier()
    assert not np.array_equal(seen["decoder"], seen["sampler"])
    np.testing.assert_array_equal(seen["decoder"], np.roll(seen["sampler"], 1, axis=0))


def test_stage2_prompt_shuffle_option_traces_and_is_checked():
    """The option wires into the stage-2 step beside the other per-example options (degrade_size,
    hq_levels: shapes only, no compile), and a probability outside [0, 1] is refused."""
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.parallel import sharding
    from diffrestorer_jax.train import stage2
    c = small_config("stage2")
    c.train.decoder_prompt_shuffle_prob, c.train.degrade_size, c.train.hq_levels_prob = 0.3, 48, 0.5
    run = Run(c, jax.devices()[:1], FAST)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in run.example_batch().items()}
    with sharding.mesh_context(run.mesh, run.rules):
        _, metrics = jax.eval_shape(run.step_fn, run.plan.state_target, run.plan.frozen_target, batch)
    assert metrics["loss"].shape == ()
    c.train.decoder_prompt_shuffle_prob = 1.5
    with pytest.raises(ValueError, match="decoder_prompt_shuffle_prob=1.5"):
        stage2.make_step(dr.build_networks(c.model), c, None, from_config(c.diffusion), None, None, lpips=())
    c.train.decoder_prompt_shuffle_prob, c.train.batch_size = 0.3, 1
    with pytest.raises(ValueError, match="needs a batch of 2 or more"):
        stage2.make_step(dr.build_networks(c.model), c, None, from_config(c.diffusion), None, None, lpips=())


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_hq_levels_option_traces_in_both_stages(tmp_path, stage):
    """train.hq_levels_prob > 0 (data/photometric.py, tested there) wires into both stages' steps:
    the step traces with it on a synthetic batch (shapes only: no compile, no weights)."""
    from diffrestorer_jax.parallel import sharding
    c = small_config(stage)
    c.train.hq_levels_prob = 0.5
    run = Run(c, jax.devices()[:1], FAST)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in run.example_batch().items()}
    with sharding.mesh_context(run.mesh, run.rules):
        new_state, metrics = jax.eval_shape(run.step_fn, run.plan.state_target, run.plan.frozen_target, batch)
    assert metrics["loss"].shape == ()
    assert jax.tree.structure(new_state) == jax.tree.structure(run.plan.state_target)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_degrade_size_option_traces_in_both_stages(stage):
    """train.degrade_size (data/context_crop.py, tested there): the data source hands images of that
    side, and each stage's step takes them and crops to image_size (shapes only: no compile)."""
    from diffrestorer_jax.parallel import sharding
    c = small_config(stage)
    c.train.degrade_size = 48
    run = Run(c, jax.devices()[:1], FAST)
    example = run.example_batch()
    assert example["hq"].shape[1:3] == (48, 48)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example.items()}
    with sharding.mesh_context(run.mesh, run.rules):
        new_state, metrics = jax.eval_shape(run.step_fn, run.plan.state_target, run.plan.frozen_target, batch)
    assert metrics["loss"].shape == ()
    assert jax.tree.structure(new_state) == jax.tree.structure(run.plan.state_target)
    data = sources.make_data(c)
    assert next(data)["hq"].shape[1:3] == (48, 48)


def test_stage2_fine_tunes_an_export_with_init_trained(tmp_path):
    """weights.init_trained: stage 2 starts its decoder (parameters and EMA) from init_from's export,
    here at another image size than the export's and fsdp-sharded over 2 devices; without it the
    decoder is derived from the export's VAE (the paper's init), and a resume's fingerprint of the
    given weights covers the decoder only with init_trained. The frozen networks are the export's
    either way; init_trained without init_from is refused."""
    from exports import tiny_export
    from diffrestorer_jax.export import load_export
    from diffrestorer_jax.train import resume_check
    path = tiny_export(tmp_path / "export")
    exported = host(load_export(path)[2])
    starts = {}
    for trained in (False, True):
        c = small_config("stage2", mesh=(1, 2))
        c.model.clip.image_size = 64  # the export's CLIP (its position embeddings); images stay 32 px
        c.weights.init_from, c.weights.init_trained = path, trained
        run = Run(c, jax.devices()[:2], FAST)
        # what a resume checks: the fingerprint covers the fine-tuned network's starting weights
        assert ("decoder" in resume_check.fingerprint(run.given)) == trained
        state, frozen = run.init()
        starts[trained] = host((state.params, state.ema, frozen))
    params, ema, frozen = starts[True]
    jax.tree.map(np.testing.assert_array_equal, params["decoder"], exported["decoder"])
    jax.tree.map(np.testing.assert_array_equal, ema["decoder"], exported["decoder"])
    derived = starts[False][0]["decoder"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(derived),
                                                         jax.tree.leaves(exported["decoder"])))
    for f in (frozen, starts[False][2]):
        jax.tree.map(np.testing.assert_array_equal, f["vae"], exported["vae"])
    c = small_config("stage2")
    c.weights.init_trained = True
    with pytest.raises(ValueError, match="init_trained=True needs weights.init_from"):
        Run(c, jax.devices()[:1], FAST)
