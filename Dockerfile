# Relay: durable stream relay. Embedded store under /data by default;
# set RELAY_DATABASE_URL to keep streams in Postgres instead.
# Access control: the container listens on 0.0.0.0, so the relay refuses to start until it is
# given credentials: mount a key file and set RELAY_AUTH_API_KEYS (or RELAY_AUTH_JWT_KEYS /
# RELAY_AUTH_JWKS_URL), as deploy/docker-compose.yml does. Only behind something that already
# authenticates every request may you set RELAY_INSECURE_NO_AUTH=true instead.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY relay ./relay
RUN pip install --no-cache-dir . && useradd --system --home /data relay && mkdir -p /data && chown relay /data
USER relay
ENV RELAY_HOST=0.0.0.0 RELAY_PORT=4437 RELAY_DATA_DIR=/data RELAY_LOG_FORMAT=json
EXPOSE 4437
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:4437/healthz', timeout=2)" || exit 1
ENTRYPOINT ["relay", "serve"]
