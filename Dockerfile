# One image for every role of the fallback service: the command picks the role
# (`smtp`, `web`, `worker`, or any admin subcommand such as `failover status`).
# Redis runs in its own container (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user: the receiver listens on 2525 inside the container,
# and the host publishes it as port 25.
RUN useradd --system --uid 10025 --home-dir /var/lib/fallback --create-home fallback

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fallback ./fallback
COPY web ./web
RUN pip install . && rm -rf /src

USER fallback
WORKDIR /var/lib/fallback
EXPOSE 2525 8080
ENTRYPOINT ["fallback"]
CMD ["--help"]
