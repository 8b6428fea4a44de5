#!/bin/sh
# Enroll once with the token the bootstrap job left in the shared volume, then run the agent.
set -eu
NAME="${CKMS_AGENT_NAME:?set CKMS_AGENT_NAME}"
CONFIG=/var/lib/ckms-agent/agent.toml
if [ ! -f "$CONFIG" ]; then
    i=0
    until [ -s "/shared/$NAME.token" ] && [ -s /shared/fingerprint ]; do
        i=$((i+1)); [ $i -gt 120 ] && { echo "no enrollment token for $NAME" >&2; exit 1; }
        sleep 1
    done
    ckms-agent enroll --controller controller:2222 --token-file "/shared/$NAME.token" \
        --host-key-fingerprint "$(cat /shared/fingerprint)" \
        --state-dir /var/lib/ckms-agent --config "$CONFIG"
fi
exec ckms-agent run --config "$CONFIG"
