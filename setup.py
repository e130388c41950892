import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SHIPPED_DIRS = ("configs", "ds_configs")  # tropd_ds/resources.py finds them here in a clone


class BuildWithShippedFiles(build_py):
    """The wheel carries configs/ (presets, model shapes, the demo config) and ds_configs/ inside the
    package, as tropd_ds/_shipped/, where tropd_ds.resources.shipped finds them once installed."""

    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for name in SHIPPED_DIRS:
            target = Path(self.build_lib) / "tropd_ds" / "_shipped" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / name, target)


setup(
    name="tropd-ds",
    version="0.1.0",
    description="Trust Region On-Policy Distillation (TrOPD) for large language models under DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tropd_ds", "tropd_ds.*"]) + ["tropd_kernels", "tropd_kernels.ops"],
    package_dir={"tropd_kernels": "kernels/tropd_kernels", "tropd_kernels.ops": "kernels/tropd_kernels/ops"},
    install_requires=[
        "torch>=2.8,<2.15",  # torch.mm(..., out_dtype=) on CUDA (tropd_kernels.projection); torch.accelerator
        "triton>=3.2,<4; platform_system == 'Linux'",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.0,<6",
        "datasets>=4.0,<6",
        "safetensors>=0.5,<1",
        "tokenizers>=0.21,<1",
        "pyyaml>=6,<7",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "accelerate>=1.1,<2",
        "numpy>=1.26",  # the checkpoint keeps NumPy's generator state
        "psutil>=5.9,<8",  # imported directly (locks, stale build locks), not only through deepspeed
        "jinja2>=3.1,<4",  # reading which keywords a chat template uses
        "huggingface_hub>=1.0,<3",  # hub data sets offline from the cache
        "pandas>=2,<4",  # reading a CSV file's header to read every column as text
        "aiohttp>=3.9,<4",  # the teacher service (tropd-ds serve-teacher) and its client in the trainer
    ],
    # Optional features; each names its extra when it is asked for and missing (tropd_ds.extras).
    extras_require={
        # ruff pinned: `make lint` checks formatting, which versions change; setuptools >= 70.1 builds wheels without
        # the `wheel` package (tests/test_wheel.py builds one in this environment; a new venv has 65.5)
        "dev": ["pytest>=8,<10", "ruff==0.17.6", "setuptools>=70.1"],
        "mutation": ["mutmut>=3.8,<4"],  # `make mutation` (scripts/mutation_test.py)
        "peft": ["peft>=0.17,<1"],  # LoRA students
        "eval": ["math-verify>=0.8,<1"],  # answer checking beyond exact match
        "liger": ["liger-kernel>=0.8"],  # scripts/bench_kernels.py's Liger comparison (GPU)
        "bench": ["trl>=1.16,<2"],  # scripts/bench_step.py's TRL comparison
        "tensorboard": ["tensorboard>=2.15,<3"],  # DeepSpeed's TensorBoard monitor
        "wandb": ["wandb>=0.17,<1"],  # DeepSpeed's Weights & Biases monitor
    },
    entry_points={"console_scripts": ["tropd-ds=tropd_ds.cli:main"]},
    cmdclass={"build_py": BuildWithShippedFiles},
)
