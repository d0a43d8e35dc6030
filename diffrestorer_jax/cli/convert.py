"""diffrestorer-convert: PyTorch Stable Diffusion / CLIP weights, once, into our Flax format.

    diffrestorer-convert --unet PATH --vae PATH --clip PATH --out DIR [--bfloat16]
                         [--clip-act gelu] [--clip-heads N]

PATH: a diffusers folder (component or pipeline root), a single-file SD checkpoint
(.safetensors / .ckpt, for --unet and --vae), or a Hugging Face / OpenAI CLIP checkpoint.
Writes DIR/unet, DIR/vae, DIR/clip (Orbax params + flax_module.json); point the config's
weights.unet / weights.vae / weights.clip at them. Any of the three may be left out.
An OpenAI / open_clip CLIP file does not say its activation: OpenAI's QuickGELU is assumed unless
--clip-act gelu is given (open_clip's own trainings, e.g. LAION ViT-H/14), and the heads follow the
released models of that width unless --clip-heads says otherwise.
Every source and destination is checked before anything is written: a DIR/<name> that exists and
is not an earlier conversion (e.g. the pipeline folder being converted) is never written over.
"""
import argparse
import functools
import os
import sys

from diffrestorer_jax.cli import startup


def _check(out: str, jobs) -> list:
    """What stops the conversion before it writes anything: a missing source, an --out that is a
    file, a destination that holds something other than an earlier conversion."""
    from diffrestorer_jax import atomic, paths
    from diffrestorer_jax.convert import is_converted
    out_path = paths.path(out)
    if out_path.exists() and not out_path.is_dir():
        return [f"--out {out}: exists and is not a folder"]
    problems = []
    for name, src in jobs:
        dest = out_path / name
        if not paths.path(src).exists():
            problems.append(f"--{name} {src}: no such file or folder")
        elif dest.exists() and not is_converted(str(dest)):
            problems.append(f"--out {out}: {dest} exists and is not an earlier conversion (it would be "
                            f"replaced): give another --out")
        else:
            try:
                atomic.check_writable(dest)
            except FileExistsError as e:
                problems.append(f"--out {out}: {e}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffrestorer-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet")
    p.add_argument("--vae")
    p.add_argument("--clip")
    p.add_argument("--out", required=True)
    p.add_argument("--bfloat16", action="store_true", help="store parameters in bfloat16")
    p.add_argument("--clip-act", choices=("quick_gelu", "gelu"),
                   help="the activation of an OpenAI / open_clip CLIP file (default quick_gelu, OpenAI's)")
    p.add_argument("--clip-heads", type=int, help="attention heads of an OpenAI / open_clip CLIP file")
    args = p.parse_args(argv)
    startup.prepare_process()
    startup.quiet_console()

    import jax.numpy as jnp
    from diffrestorer_jax import convert
    dtype = jnp.bfloat16 if args.bfloat16 else None
    clip_file_options = {k: v for k, v in (("hidden_act", args.clip_act),
                                           ("num_attention_heads", args.clip_heads)) if v is not None}
    jobs = [("unet", args.unet, convert.load_unet), ("vae", args.vae, convert.load_vae),
            ("clip", args.clip, functools.partial(convert.load_clip_vision, **clip_file_options))]
    if not any(src for _, src, _ in jobs):
        p.error("nothing to convert: give --unet, --vae and/or --clip")
    if clip_file_options and not (args.clip and os.path.isfile(args.clip)):
        p.error("--clip-act / --clip-heads are for an OpenAI / open_clip --clip file (a Hugging Face "
                "folder's config.json gives both)")
    if args.clip and os.path.isfile(args.clip) and args.clip_act is None:
        print(f"note: {args.clip}: an OpenAI / open_clip file does not say its activation; QuickGELU "
              f"(OpenAI's) is assumed: give --clip-act gelu for open_clip's own trainings (e.g. LAION)",
              file=sys.stderr)
    problems = _check(args.out, [(name, src) for name, src, _ in jobs if src])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    for name, src, load in jobs:
        if not src:
            continue
        dest = f"{args.out.rstrip('/')}/{name}"
        try:  # a bad source names its file; an unreadable source or unwritable --out is an OSError
            module, params = load(src, dtype)
            convert.save_converted(dest, module, params)
        except (convert.CheckpointError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{name}: {src} -> {dest} ({type(module).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
