#!/bin/sh
# Nix post-build-hook: queue the outputs of every local build for upload to
# a Larder cache by the watcher-agent.
#
#   nix.conf:  post-build-hook = /path/to/post-build-hook.sh
#   cache:     LARDER_HOOK_CACHE=server:cache (or cache on the default
#              server), in the environment or in the file named by
#              LARDER_HOOK_ENV (default /etc/larder/hook.env), which may
#              also set XDG_CONFIG_HOME, XDG_STATE_HOME or LARDER_SPOOL_DIR
#              when the hook runs under nix-daemon, as root.
#
# Under nix-daemon the hook runs as root while the agent runs as its own
# user (larder-agent-system.service): point XDG_CONFIG_HOME in hook.env at
# the agent user's config, whose `[agent] spool-dir` names the queue. What
# root queues there is given to the queue directory's owner, the agent's
# user, so no umask or group is needed here.
#
# `larder queue` only writes the paths into the agent's durable queue (a
# few milliseconds, no network), so builds are not slowed down, and paths
# built while the agent or the server is down are uploaded later.
#
# This hook never fails the build: Nix runs no further builds after a
# failed post-build-hook, and a cache problem must not stop a build. Every
# problem is reported on stderr (Nix shows it in the build's output) and
# the hook exits 0.
#
# Nix 2.8 leaves OUT_PATHS empty (NixOS/nix#6446); the outputs then come
# from DRV_PATH.

hook_env=${LARDER_HOOK_ENV:-/etc/larder/hook.env}
if [ -r "$hook_env" ]; then
    # Exported (set -a), since `larder` must see what it sets
    # (XDG_CONFIG_HOME, LARDER_SPOOL_DIR, …), not only this script.
    set -a
    # shellcheck source=/dev/null
    . "$hook_env"
    set +a
fi

log() {
    echo "larder post-build-hook: $*" >&2
}

cache=${LARDER_HOOK_CACHE:-}
if [ -z "$cache" ]; then
    log "LARDER_HOOK_CACHE is not set; not queuing ${OUT_PATHS:-the outputs of ${DRV_PATH:-this build}}"
    exit 0
fi

outs=${OUT_PATHS:-}
if [ -z "$outs" ]; then
    if [ -z "${DRV_PATH:-}" ]; then
        log "neither OUT_PATHS nor DRV_PATH is set; is this running as Nix's post-build-hook?"
        exit 0
    fi
    # nix-store's own error, if any, goes to the build's output as it is.
    if ! outs=$(nix-store --query --outputs "$DRV_PATH"); then
        log "cannot list the outputs of $DRV_PATH; not queuing them"
        exit 0
    fi
fi

# Word splitting is wanted: store paths contain no spaces. larder's lines
# ("queued …", a warning when no agent runs, an error) go to the build's
# output.
# shellcheck disable=SC2086
if ! "${LARDER_BIN:-larder}" queue "$cache" $outs; then
    log "the outputs were not queued for $cache; the build goes on"
fi
exit 0
