# The gateway as a container: proxy listener on 8080, admin listener (/healthz, /metrics) on 8081.
#
#   docker build -t keygate .
#   docker run -p 8080:8080 -v "$PWD/gateway.yaml:/srv/gateway/gateway.yaml:ro" keygate
#
# The config is read from /srv/gateway/gateway.yaml (the working directory), or from $GATEWAY_CONFIG.
# Data the embedded store writes lands in /srv/gateway: mount a volume there to keep it.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:8081/healthz
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --disable-pip-version-check /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /srv/gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /srv/gateway \
    && chown gateway:gateway /srv/gateway
WORKDIR /srv/gateway
COPY --chown=gateway:gateway gateway.yaml ./
USER gateway
EXPOSE 8080 8081
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTHCHECK_URL'], timeout=3)"]
ENTRYPOINT ["gateway"]
CMD ["run"]
