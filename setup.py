"""deepspeed_checkfree: checkpoint-free recovery of lost pipeline stages for DeepSpeed and Megatron."""
import re
from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    """The package's ``__version__`` (one definition: ``checkfree --version`` prints the same)."""
    init = (Path(__file__).resolve().parent / "deepspeed_checkfree" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', init, re.MULTILINE).group(1)


setup(
    name="deepspeed_checkfree",
    version=read_version(),
    description="CheckFree / CheckFree+: rebuild a lost pipeline stage from its neighbours, without checkpoints",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deepspeed_checkfree*"]),
    # The demo corpus ships inside the package, so a non-editable install finds it.
    package_data={"deepspeed_checkfree.models": ["sotu.txt.xz"]},
    # The engine subclasses private DeepSpeed internals: pin the version the contract test checks.
    install_requires=["deepspeed==0.19.8", "torch>=2.6", "pyyaml", "numpy"],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3"],
                    # megatron-core 0.17+ needs Python >= 3.12: 0.16.1 (the last for 3.10/3.11, which ships only
                    # megatron.core: megatron.training comes from a Megatron-LM core_v0.16.1 checkout) below, 0.19.x
                    # (whose wheel ships megatron.training) from 3.12. megatron.training also imports six and regex
                    # (pyyaml is required above; pydantic comes with deepspeed); torch_dist saves need psutil.
                    "megatron": ['megatron-core==0.16.1; python_version < "3.12"',
                                 'megatron-core>=0.19.2,<0.20; python_version >= "3.12"', "psutil", "six", "regex"],
                    "experiment": ["matplotlib"],
                    # The job's store in etcd (resilience/etcd_store.py): etcd's v3 gRPC JSON gateway client.
                    "etcd": ["etcd3gw==2.7.0"]},
    entry_points={"console_scripts": ["checkfree=deepspeed_checkfree.cli:main"]},
)
