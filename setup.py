"""deltal_jax: RLVR for language models in JAX/Flax, built around ΔL Normalization."""

from setuptools import find_packages, setup

# The notebooks under notebooks/ are executed by the test suite (nbclient, ipykernel).
TEST = [
    "pytest>=8",
    "pytest-xdist>=3.8",  # -n 2 in .ci/run; 3.8 has --no-loadscope-reorder
    "hypothesis>=6.100",
    "ruff>=0.6",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
]
# Accelerator builds of JAX (launch/tpu.py and launch/gpu.py install them). cuda12 wheels
# bring their own CUDA libraries and need an NVIDIA driver >= 525; jax[cuda13] would need
# >= 580.
TPU = ["jax[tpu]>=0.6"]
CUDA = ["jax[cuda12]>=0.6"]
HF = ["safetensors>=0.4", "tokenizers>=0.19"]
# Logit-parity tests against HF transformers. torch is pinned to the CPU build so a fresh
# machine does not pull a multi-gigabyte CUDA wheel just to compare logits.
PARITY = ["torch==2.13.0", "transformers>=4.45", *HF]

setup(
    name="deltal_jax",
    version="0.1.0",
    description="Reinforcement learning with verifiable rewards in JAX/Flax: ΔL Normalization "
    "and the loss aggregators, advantage estimators and KL configurations it is compared with.",
    packages=find_packages(include=["deltal_jax", "deltal_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml_collections>=1.0",
        "tensorflow-datasets>=4.9.8",
        # tfds imports it to locate builders defined inside a package (deltal_jax.data)
        # but does not declare it for Python >= 3.9.
        "importlib_resources>=5",
        "numpy>=1.26",
        "sympy>=1.12",
        # HF checkpoint layout: the default run's tiny model is stored and loaded this way.
        "safetensors>=0.4",
        "tokenizers>=0.19",
        # metrics.plot_curves writes the run's learning curves as a PNG.
        "matplotlib>=3.8",
    ],
    entry_points={"console_scripts": ["deltal-train = deltal_jax.main:run"]},
    extras_require={
        "test": TEST,
        "hf": HF,
        "parity": PARITY,
        "tpu": TPU,
        "cuda": CUDA,
    },
)
