# discoproxy as a sidecar container.
#
#   docker build -t discoproxy .
#   docker run -d -p 25565:25565 -v /var/run/docker.sock:/var/run/docker.sock:ro discoproxy
#
# Where no registry answers and build containers cannot reach PyPI (the project's CI), build
# on the debootstrap base from wheels the host downloaded:
#
#   image/build-base-image.sh && image/build-wheels.sh
#   docker build --build-arg BASE=discoproxy-base:bookworm -t discoproxy .
#
# Both bases are Debian bookworm with Python 3.11. The dependencies are the ones uv.lock
# pins (hash-checked), from PyPI, or only from image/wheels/ when it holds wheels.
#
# Configuration: environment variables (DISCOPROXY_CONFIG=/path/to/config.toml, and
# DISCOPROXY_<KEY> for a top-level key, `__` for nesting: DISCOPROXY_LOG_LEVEL=DEBUG,
# DISCOPROXY_ADMIN__LISTEN=0.0.0.0:8404), a config file mounted read-only (e.g. at
# /etc/discoproxy/config.toml with DISCOPROXY_CONFIG pointing at it), or the arguments of
# `serve`. Server files go in /etc/discoproxy/servers. The process runs as the unprivileged
# user discoproxy (uid 10001) with the Docker socket's group: see image/entrypoint.sh.

# 3.11, not a newer CPython: the data plane costs ~12 % more instructions per connection
# on 3.12 and 3.13 (bench/README.md, `python -m bench.instructions`).
ARG BASE=python:3.11-slim-bookworm

# -- build: a virtualenv with the locked dependencies, then discoproxy itself -------------
FROM ${BASE} AS build

ARG UV_VERSION=0.13.9
# image/wheels/ holds only its README in a clone: packages come from PyPI. With wheels in
# it, every install below gets $index = "--no-index --find-links /wheels" (pip and uv alike)
# and nothing is fetched.
COPY image/wheels/ /wheels/
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        echo 'index="--no-index --find-links /wheels"' >/wheels/index.env; \
    else \
        echo 'index=' >/wheels/index.env; \
    fi \
    && . /wheels/index.env \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check $index "uv==${UV_VERSION}"

ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
# Dependencies first: a change to the code reinstalls only discoproxy, not the rest.
COPY pyproject.toml uv.lock ./
RUN . /wheels/index.env \
    && /opt/uv/bin/uv export --frozen --no-dev --no-emit-project --quiet -o requirements.txt \
    && /opt/uv/bin/uv venv --quiet --python python3 /opt/discoproxy \
    && /opt/uv/bin/uv pip install --python /opt/discoproxy/bin/python $index --require-hashes \
        -r requirements.txt
COPY README.md ./
COPY discoproxy ./discoproxy
COPY providers ./providers
RUN . /wheels/index.env \
    && /opt/uv/bin/uv pip install --python /opt/discoproxy/bin/python $index --no-deps . \
    && /opt/discoproxy/bin/discoproxy --help >/dev/null

# -- runtime: the base, a user, the virtualenv ---------------------------------------------
FROM ${BASE}

RUN groupadd --gid 10001 discoproxy \
    && useradd --uid 10001 --gid discoproxy --home-dir /var/lib/discoproxy \
        --create-home --shell /usr/sbin/nologin discoproxy \
    && mkdir -p /etc/discoproxy/servers
COPY image/entrypoint.sh /usr/local/bin/discoproxy-entrypoint
COPY --from=build /opt/discoproxy /opt/discoproxy

ENV PATH=/opt/discoproxy/bin:$PATH \
    HOME=/var/lib/discoproxy \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DISCOPROXY_SERVERS_DIR=/etc/discoproxy/servers
# Relative paths in the config (bans_file = "bans.json" …) land in the user's own directory.
WORKDIR /var/lib/discoproxy
EXPOSE 25565

# `discoproxy health` asks the admin listener's /healthz (127.0.0.1:8404 unless configured).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["discoproxy", "health"]

ENTRYPOINT ["discoproxy-entrypoint"]
CMD ["serve"]
