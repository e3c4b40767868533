# The Tripwire worker image used by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY tripwire ./tripwire
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/tripwire tripwire \
    && mkdir -p /var/lib/tripwire \
    && chown tripwire /var/lib/tripwire

USER tripwire
ENV TRIPWIRE_DATA_DIR=/var/lib/tripwire \
    TRIPWIRE_WEB_HOST=0.0.0.0 \
    TRIPWIRE_WEB_PORT=6066
EXPOSE 6066
CMD ["tripwire", "worker"]
