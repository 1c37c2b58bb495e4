# Butterfly node image: CPU torch, non-root, health check on the gateway's /health.
#
#   docker build -t butterfly .
#   docker run --rm butterfly --help
#
# One image for every node; what a container is comes from the host directory
# `butterfly init` wrote, mounted at /var/lib/butterfly (config, node key, TLS files,
# and the node's data, which the node writes there). docs/DEPLOY.md walks through it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GOMP_SPINCOUNT=20000

WORKDIR /opt/butterfly
# a C compiler: a node builds its blocked fp32 kernel at load (runtime/native.py), which
# streamed decode products 1.5x faster than torch's kernels on an AMD EPYC; without one,
# that candidate is skipped and torch's kernels run
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first, from the CPU index: the default index's wheel pulls several GB of CUDA
# packages. The pin is constraints.txt's; the install below keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/butterfly butterfly \
    && mkdir -p /var/lib/butterfly \
    && chown butterfly:butterfly /var/lib/butterfly

USER butterfly
WORKDIR /var/lib/butterfly
VOLUME ["/var/lib/butterfly"]
# 9000: peers (TCP, and UDP for heartbeats); 8080: the HTTP API (node 0, the first
# gateway; the k-th gateway-capable node of cluster.gateways serves it on 8080 + k)
EXPOSE 9000/tcp 9000/udp 8080/tcp

# The check asks node 0's port; the compose file turns it off on the other nodes (a
# standby gateway's /health answers 503, and the acting gateway's /health reports every
# node). 503 (cluster unhealthy, or not the acting gateway) fails the check too.
ENV HEALTH_URL=http://127.0.0.1:8080/health
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTH_URL'], timeout=4)"]

ENTRYPOINT ["butterfly"]
CMD ["start", "--config", "/var/lib/butterfly/butterfly.toml"]
