# The gateway as a container: slim, non-root, with a health check on the admin port.
#   docker build -t trio-mobile-gateway .
#   docker run -p 8765:8765 -p 8766:8766 -e GATEWAY__ADMIN__API_KEY=... trio-mobile-gateway
# Configuration comes from the environment (GATEWAY__<SECTION>__<KEY>) or a file mounted
# at /etc/gateway/gateway.toml and passed with --config. See docs/deployment.md.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY push ./push
COPY presence ./presence
RUN python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir --disable-pip-version-check \
       -c constraints.txt .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway \
       --create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY__SERVER__HOST=0.0.0.0 \
    GATEWAY__ADMIN__HOST=0.0.0.0 \
    GATEWAY__STORE__PATH=/var/lib/gateway/gateway.db \
    GATEWAY__LOG__FORMAT=json
USER gateway
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 8765 8766
# SIGTERM drains: readiness off, 1012 closes spread over [server] drain_seconds, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8766/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["gateway"]
CMD ["serve"]
