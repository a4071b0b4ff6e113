# Stand-in for Docker Hub's python:3.11-slim (the test's machine has no route to Docker Hub):
# Debian bookworm's Python 3.11, with python and pip on PATH as in the official image. pip
# trusts what the machine trusts (host-ca.crt, a copy of its CA bundle): its registries may
# be reached through a proxy with a CA of its own.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python
COPY host-ca.crt /usr/local/share/host-ca.crt
ENV PATH=/usr/local/python/bin:$PATH PIP_CERT=/usr/local/share/host-ca.crt
