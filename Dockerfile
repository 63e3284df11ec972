# artifact-router: the daemon as a sidecar or a service.
#   docker build -t artifact-router .
#   docker run -v spool:/data/spool -v state:/data/state -p 9464:9464 artifact-router
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ROUTER_CONFIG=/etc/artifact-router/router.yaml \
    ROUTER_LISTEN=0.0.0.0:9464

WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY sinks ./sinks
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 router \
    && mkdir -p /data/spool /data/state /data/artifacts \
    && chown -R router:router /data
COPY docker/router.yaml /etc/artifact-router/router.yaml

USER 10001
WORKDIR /data
VOLUME ["/data/spool", "/data/state", "/data/artifacts"]
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ['ROUTER_LISTEN'].rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["artifact-router"]
CMD ["run"]
