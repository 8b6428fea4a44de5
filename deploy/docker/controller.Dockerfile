# ckms controller image. Build from the repository root:
#   docker build -f deploy/docker/controller.Dockerfile -t ckms-controller .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ckms ckms
COPY agents agents
COPY deploy/kafka deploy/kafka
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/ckms --create-home ckms \
    && mkdir -p /shared && chown ckms:ckms /shared
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY deploy/compose/controller-bootstrap.sh /usr/local/bin/ckms-controller-bootstrap
USER ckms
WORKDIR /var/lib/ckms
VOLUME ["/var/lib/ckms"]
EXPOSE 2222
ENTRYPOINT ["ckms"]
CMD ["controller", "run", "--config", "/var/lib/ckms/controller.toml"]
