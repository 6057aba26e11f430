#!/bin/sh
# compose.yaml's one-shot `garage-init`: gives the single Garage node a
# layout, then creates Larder's bucket and imports its key with the
# permissions Larder needs. Idempotent: each step is skipped when done, so
# the job can run on every `docker compose up`.
#
# Needs: the Garage config (/etc/garage.toml) and the node's metadata
# directory (read-only, for the node id), GARAGE_RPC_SECRET, and
# LARDER_S3_BUCKET, LARDER_S3_ACCESS_KEY_ID, LARDER_S3_SECRET_ACCESS_KEY.
set -eu

garage() { /usr/local/bin/garage -c /etc/garage.toml "$@"; }

tries=0
until garage status >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { echo "garage-init: Garage does not answer" >&2; exit 1; }
    sleep 1
done

# The layout lists nodes by the first 16 hex digits of their id.
node_id=$(garage node id -q)
node_id=${node_id%%@*}
short_id=$(printf '%.16s' "$node_id")
if ! garage layout show | grep -q "^$short_id"; then
    garage layout assign -z dc1 -c 10G "$short_id"
    garage layout apply --version 1
fi
garage bucket info "$LARDER_S3_BUCKET" >/dev/null 2>&1 \
    || garage bucket create "$LARDER_S3_BUCKET"
garage key info "$LARDER_S3_ACCESS_KEY_ID" >/dev/null 2>&1 \
    || garage key import --yes -n larder "$LARDER_S3_ACCESS_KEY_ID" "$LARDER_S3_SECRET_ACCESS_KEY"
garage bucket allow --read --write --owner "$LARDER_S3_BUCKET" --key "$LARDER_S3_ACCESS_KEY_ID"
echo "garage-init: bucket $LARDER_S3_BUCKET ready for key $LARDER_S3_ACCESS_KEY_ID"
