from setuptools import find_packages, setup

TORCH = ["torch==2.13.0", "diffusers", "transformers", "safetensors"]

setup(
    name="jaxedit",
    version="0.1.0",
    description="JAX/TPU-native trainer for instruction-based image editing with RL",
    packages=find_packages(include=["jaxedit", "jaxedit.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "ml_collections",
        "tensorflow-datasets",
        "importlib_resources",  # TFDS needs it for builders defined outside TFDS
        "array_record",
        "einops",
        "clu",
        # clu.metric_writers imports them without declaring them; TFDS needs TF to build.
        "tensorflow-cpu",
        "tensorboard",
        "numpy",
        "pillow",
        "tokenizers",
        "transformers",  # FLUX pipelines' CLIP and T5 tokenizers (no torch needed)
        "sentencepiece",  # a T5 tokenizer folder with spiece.model and no tokenizer.json
        "safetensors",  # export and init_from (numpy side; no torch needed)
        "ml_dtypes",  # bfloat16 tensors in safetensors
        "gguf",  # init_from a GGUF file (the planner's LM): dequantized by llama.cpp's reader
    ],
    extras_require={
        # torch==2.13.0 is the CPU wheel; any other spec pulls GBs of CUDA packages.
        "torch": TORCH,
        "tpu": ["jax[tpu]"],  # on TPU VMs: python launch/tpu_vm.py ... --extras tpu
        # accelerate: transformers' own GGUF loading, the reference of the GGUF import test
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "accelerate",
                 *TORCH],
    },
    entry_points={"console_scripts": ["jaxedit=jaxedit.cli:main"]},
)
