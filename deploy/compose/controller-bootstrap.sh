#!/bin/sh
# One-shot setup for compose.yaml: initialise the controller once, then (after it runs) unseal it
# and create enrollment tokens for the agents in the shared volume.
set -eu
HOME_DIR=/var/lib/ckms
SHARED=/shared
PASSFILE=/run/secrets/ckms_passphrase
export CKMS_CONTROLLER=controller:2222 CKMS_USER=admin CKMS_IDENTITY="$SHARED/admin_ed25519"

case "${1:-init}" in
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
