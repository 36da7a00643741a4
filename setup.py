"""lpe_jax: Logit Path Extrapolation in JAX."""

from setuptools import find_namespace_packages, setup

setup(
    name="lpe_jax",
    version="0.1.0",
    description="Estimate rare language-model behaviours by Logit Path Extrapolation, in JAX.",
    # Namespace discovery lists the data-only asset folders as packages too (find_packages
    # would leave them out, and setuptools warns about each of them on every install).
    packages=find_namespace_packages(include=["lpe_jax", "lpe_jax.*"], exclude=["*.__pycache__"]),
    package_data={"lpe_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.12",
        "transformers>=4.51",
        "tokenizers",
        "jinja2",  # chat templates (transformers needs it but does not require it)
        "numpy",
        "scipy",
        "optax",
        "orbax-checkpoint",
        "absl-py",
        "safetensors",
        "ml_dtypes",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        # torch is only a parity reference for the tests; 2.13.0 is the CPU build on this machine.
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "ruff",
            "torch==2.13.0",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
)
