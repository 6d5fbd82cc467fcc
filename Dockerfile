# mamba-extend-server images, two targets:
#   cpu:  torch's CPU build, the project and its embedded model; runs anywhere.
#   cuda: (the last stage, so the default) an NVIDIA GPU image with the mamba_ssm and causal_conv1d kernels.
# Not built by this project (no Docker or Podman engine on its machines); README.md "Docker" says how to build
# and run each. Base images are fully qualified (docker.io/...), so podman and buildah need no search registries;
# there is no `# syntax=` line, so BuildKit uses its built-in frontend and fetches none.
#   docker build --target cpu -t mamba-extend-server:cpu .
#   docker build -t mamba-extend-server .
#   docker run -p 8000:8000 mamba-extend-server:cpu [server flags]
#   docker run --gpus all -p 8000:8000 mamba-extend-server [server flags, e.g. --model /models/x]

ARG CUDA=12.8.1
ARG UBUNTU=ubuntu24.04
ARG PYTHON=3.12
# mamba-ssm 2.3 needs triton >= 3.5, which comes with torch >= 2.9.
ARG TORCH=2.9.1

# --- cpu: Debian's slim Python image. gcc builds the CPU scan kernel (runtime/ops/cpu_scan.c) when the server
# starts: it is compiled for the CPU it runs on, so it cannot be built here.
FROM docker.io/library/python:${PYTHON}-slim-bookworm AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH
RUN pip install --no-cache-dir "torch==${TORCH}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY . .
# Editable: the server finds the embedded model beside its package, in /app/models.
RUN pip install --no-cache-dir -e .
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin server
ENV PYTHONUNBUFFERED=1
USER server
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Flags given to `docker run` are appended; a later --device or --host wins over these.
ENTRYPOINT ["python", "-m", "server", "--host", "0.0.0.0", "--device", "cpu"]

# --- build (for cuda): mamba-ssm and causal-conv1d come from PyPI as source. Their setup needs torch already installed
# (--no-build-isolation) and nvcc, which only the devel image has; it fetches a prebuilt wheel matching torch,
# CUDA and Python where the projects publish one, and compiles otherwise.
FROM docker.io/nvidia/cuda:${CUDA}-cudnn-devel-${UBUNTU} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && pip install --no-cache-dir --upgrade pip setuptools wheel packaging ninja
ARG TORCH
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir "torch==${TORCH}" --index-url "${TORCH_INDEX}"
# MAX_JOBS bounds the parallel nvcc processes (several GiB each) when the kernels compile.
RUN MAX_JOBS=4 pip install --no-cache-dir --no-build-isolation "causal-conv1d==1.7.0" "mamba-ssm==2.3.2.post1"
WORKDIR /app
COPY . .
# Editable: the server finds the embedded model beside its package, in /app/models.
RUN pip install --no-cache-dir -e .

# --- cuda: the venv and the project, on the smaller runtime image.
FROM docker.io/nvidia/cuda:${CUDA}-cudnn-runtime-${UBUNTU} AS cuda
# gcc and the Python headers: Triton (mamba_ssm's Mamba2 and decode kernels) compiles a small launcher at first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin server
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
USER server
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Flags given to `docker run` are appended; a later --device or --host wins over these.
ENTRYPOINT ["python", "-m", "server", "--host", "0.0.0.0", "--device", "cuda"]
