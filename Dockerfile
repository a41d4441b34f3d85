# The juturna-operator image.
#   podman build -t juturna-operator .                   (or docker build)
#   podman build --build-arg BASE_IMAGE=<local python 3.12 image> .   (no registry: see
#   hack/make-base-image.sh, which the image test uses)
# Runs as user 10001 with a read-only root filesystem; the work folder is a volume.
ARG BASE_IMAGE=python:3.12-slim

# --- build: a virtualenv with the operator and its dependencies, from wheels ---------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/juturna-operator
# The dependencies first, in their own layer: a code change then rebuilds in seconds.
COPY pyproject.toml README.md ./
RUN python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' >requirements.txt \
 && /opt/juturna-operator/bin/pip install --no-compile -r requirements.txt
COPY operator ./operator
RUN /opt/juturna-operator/bin/pip install --no-compile --no-deps . \
 && /opt/juturna-operator/bin/python -m compileall -q /opt/juturna-operator/lib

# --- runtime ----------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# Juturna's file and RTP media nodes run the ffmpeg binary. tini is PID 1: it reaps the
# orphans re-parented to it (workers whose zygote died, programs their nodes left behind),
# which the operator would leave as zombies, and passes signals on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/juturna-operator /opt/juturna-operator
# Plugins come in at /plugins: a layer of your own (FROM juturna-operator, COPY ... /plugins/),
# a ConfigMap or a volume. The work folder is the only place the operator writes.
# The demo plugin (tones) is there so that examples/pipeline.yaml runs out of the box.
COPY examples/plugins/tones /plugins/tones
# The user has a passwd entry: kopf names itself after getpass.getuser(), which looks the uid
# up; podman adds an entry at run time, containerd (so every Kubernetes node) does not.
RUN groupadd --system --gid 10001 juturna \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/juturna-operator --shell /usr/sbin/nologin juturna \
 && mkdir -p /var/lib/juturna-operator \
 && chown 10001:10001 /var/lib/juturna-operator
ENV PATH=/opt/juturna-operator/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    JUTURNA_OPERATOR_PLUGIN_PATH=/plugins \
    JUTURNA_OPERATOR_WORKDIR=/var/lib/juturna-operator
VOLUME ["/var/lib/juturna-operator"]
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["tini", "--", "juturna-operator"]
CMD ["run", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
