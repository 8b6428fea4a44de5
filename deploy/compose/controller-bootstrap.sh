#!/bin/sh
# One-shot setup for compose.yaml: the demo CA and Kafka certificates (pki), the Kafka ACLs
# (acls), initialise the controller once (init), then (after it runs) unseal it and create
# enrollment tokens for the agents in the shared volume (enroll).
set -eu
HOME_DIR=/var/lib/ckms
SHARED=/shared
PASSFILE=/run/secrets/ckms_passphrase
export CKMS_CONTROLLER=controller:2222 CKMS_USER=admin CKMS_IDENTITY="$SHARED/admin_ed25519"

case "${1:-init}" in
pki)
    # A demo CA and the certificates of the broker, the controller and the agents (run as root).
    if [ ! -f /pki/ca/ca.pem ]; then
        python3 -m ckms.devkafka pki /pki --broker kafka --broker-mount /mnt/shared/config \
            --client controller:controller --client agent:agent-1 --client agent:agent-2
    fi
    chown -R 1000:1000 /pki/broker          # apache/kafka runs as appuser (uid 1000)
    chown -R ckms:ckms /pki/controller /pki/admin
    ;;
acls)
    python3 -m ckms.devkafka acls --bootstrap kafka:9092 --tls-dir /pki/admin
    ;;
init)
    if [ ! -f "$HOME_DIR/controller.toml" ]; then
        [ -f "$CKMS_IDENTITY" ] || ssh-keygen -q -t ed25519 -N '' -C admin -f "$CKMS_IDENTITY"
        ckms init --home "$HOME_DIR" --passphrase-file "$PASSFILE" \
            --admin admin --admin-key "$CKMS_IDENTITY.pub" \
            --kafka kafka:9092 --listen 0.0.0.0:2222 --json \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["host_key_fingerprint"])' \
            > "$SHARED/fingerprint"
    fi
    ;;
enroll)
    wait_for_controller() { i=0; until ckms status >/dev/null 2>&1 || [ $? -eq 4 ]; do i=$((i+1)); [ $i -gt 60 ] && exit 1; sleep 1; done; }
    export CKMS_CONTROLLER_FINGERPRINT="$(cat "$SHARED/fingerprint")"
    wait_for_controller
    ckms unseal --passphrase-file "$PASSFILE" || true
    for host in agent-1 agent-2; do
        [ -f "$SHARED/$host.token" ] && continue
        ckms host enroll "$host" --label env=demo --label role=web --json \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' > "$SHARED/$host.token"
    done
    ;;
esac
