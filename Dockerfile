# ghost-deploy engine stage on x86-64 with a discrete NVIDIA GPU: builds and verifies TensorRT 10.x engines.
# The NGC TensorRT image brings TensorRT, its Python bindings, CUDA and trtexec (24.08 = TensorRT 10.3, the
# version JetPack 6 ships, so x86 results compare with Orin). Override TRT_IMAGE for another 10.x/11.x release.
# The engine path is torch-free: the package is installed without its dependencies, then only what the
# engine stage needs, so no multi-GB torch wheel lands in the image.
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:24.08-py3
FROM ${TRT_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GHOST_DEPLOY_TARGETS_DIR=/opt/ghost-deploy/engines/targets

WORKDIR /opt/ghost-deploy
COPY pyproject.toml README.md ./
COPY ghost_deploy ./ghost_deploy
COPY engines ./engines

RUN python3 -m pip install --no-deps . \
 && python3 -m pip install "numpy>=1.24,<3" "pyyaml>=6,<7" "click>=8.1,<9" "tqdm>=4.66,<5" \
        "onnx>=1.16,<2" "onnxruntime>=1.18,<2" "cuda-python>=12.4,<14" \
 && python3 -c "import tensorrt, ghost_deploy.engines; print('TensorRT', tensorrt.__version__)"

WORKDIR /work
ENTRYPOINT ["ghost-deploy"]
CMD ["build-engine", "--help"]
