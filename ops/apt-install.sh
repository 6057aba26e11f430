#!/usr/bin/env bash
# Installs Debian packages without starting their services, as root:
#
#   ops/apt-install.sh PACKAGE…
#
# The packages' postinst scripts try to start system services, which the
# suite and the benchmarks never want: ops/services.sh runs its own
# instances, and Debian's nginx would take port 80. A policy-rc.d that
# refuses every start keeps them from running. It is created only if there
# is none, and removed right after. apt-get waits for another apt/dpkg run
# to finish instead of failing on its lock. Run `apt-get update` first.
set -euo pipefail

policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 install "$@" || status=$?
((made_policy == 0)) || rm -f "$policy"
exit "$status"
