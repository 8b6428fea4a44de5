# ckms host agent image (for containers that stand in for hosts, e.g. compose.yaml).
#   docker build -f deploy/docker/agent.Dockerfile -t ckms-agent .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ckms ckms
COPY agents agents
COPY deploy/kafka deploy/kafka
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY deploy/compose/agent-entrypoint.sh /usr/local/bin/ckms-agent-entrypoint
VOLUME ["/var/lib/ckms-agent", "/etc/ckms/keys"]
ENTRYPOINT ["/usr/local/bin/ckms-agent-entrypoint"]
