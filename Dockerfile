# swarm on CPU: `docker build -t swarm .`, then e.g. `docker run --rm swarm --help`.
# It installs the way scripts/install.sh does (torch's CPU wheel first, then swarm), through the same
# script: deploy/install-image.sh, which a test runs outside Docker too.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 SWARM_STATE_DIR=/var/lib/swarm
WORKDIR /opt/swarm
COPY pyproject.toml README.md ./
COPY core core
COPY shards shards
COPY dht dht
COPY net net
COPY peers peers
COPY trainer trainer
COPY delegation delegation
COPY bootstrap bootstrap
COPY swarm swarm
COPY deploy/install-image.sh deploy/install-image.sh
COPY scripts/install-torch.sh scripts/install-torch.sh
RUN deploy/install-image.sh /opt/swarm/venv cpu \
    && useradd --system --home-dir /var/lib/swarm --create-home swarm
ENV PATH=/opt/swarm/venv/bin:$PATH
USER swarm
VOLUME /var/lib/swarm
# 31337: the DHT (libp2p), 8002: the bootstrap's dashboard, 8000: serve-api, 9100: /metrics, /health, /ready
EXPOSE 31337 8002 8000 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get(\"SWARM_HEALTH_URL\", \"http://127.0.0.1:9100/health\"), timeout=4)"]
ENTRYPOINT ["swarm"]
