#!/usr/bin/env bash
# Installs what Larder's test suite needs on a fresh Debian 12 machine, as root:
#   - Debian packages: nix-bin (the real Nix client), rabbitmq-server,
#     PostgreSQL (the `postgresql` package, 15 on Debian 12), zstd, openssl
#     (ops/services.sh mints a throwaway CA with it), nginx (the TLS
#     terminator in front of Garage, and the reverse proxy of the TLS tests)
#     and systemd (for `systemd-analyze verify` of the shipped unit files;
#     nothing is run under it);
#   - Garage 2.5.0 (S3), built from crates.io with `cargo install`;
#   - cargo-nextest, the test runner;
#   - a current Nix (Debian sid's nix-bin, 2.34) beside Debian 12's 2.8: a
#     minimal sid root made with debootstrap in $LARDER_CACHE_DIR/nix-current
#     (about 3 minutes, once per machine), and wrappers in its `bin/`
#     (`nix`, `nix-store`, …) that run the chroot's programs with /proc,
#     /dev and /tmp mounted into it (mounted on first use), so that paths
#     under /tmp mean the same on both sides. See ../shared/nix-current.md.
#
# Idempotent and quiet: what is already there is skipped, `apt-get update`
# runs only when a package is missing, and nothing is printed on success
# except what gets installed. On failure the tail of the failing step's log
# is printed and the script exits non-zero.
#
# The first run on a new machine spends most of its time building Garage
# (about 15 minutes on 2 cores). Its build directory is kept in
# $LARDER_CACHE_DIR (default ~/.cache/larder), outside any clone, so an
# interrupted build resumes instead of starting over.
set -euo pipefail

readonly GARAGE_VERSION=2.5.0
readonly CACHE_DIR=${LARDER_CACHE_DIR:-$HOME/.cache/larder}
export PATH="$HOME/.cargo/bin:$PATH"

log_dir=$(mktemp -d "${TMPDIR:-/tmp}/larder-install.XXXXXX")
trap 'rm -rf "$log_dir"' EXIT

say() { printf 'install: %s\n' "$*" >&2; }

die() {
    say "error: $*"
    exit 1
}

# Runs a command with its output in a log file; prints the log's tail and
# fails if the command fails.
run_logged() {
    local name=$1
    shift
    local log="$log_dir/$name.log"
    if ! "$@" >"$log" 2>&1; then
        say "error: '$*' failed; last lines of its output:"
        tail -n 40 "$log" | sed 's/^/    /' >&2
        exit 1
    fi
}

package_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# Any PostgreSQL server version will do; Debian 12's `postgresql` is 15.
postgres_installed() {
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

install_debian_packages() {
    local missing=()
    local package
    for package in nix-bin rabbitmq-server zstd openssl nginx systemd; do
        package_installed "$package" || missing+=("$package")
    done
    postgres_installed || missing+=(postgresql)
    ((${#missing[@]} > 0)) || return 0

    [[ $EUID -eq 0 ]] || die "missing packages (${missing[*]}); run as root to install them"
    say "installing Debian packages: ${missing[*]}"
    run_logged apt-update apt-get -q -y -o DPkg::Lock::Timeout=600 update
    # Recommends stay on: nix-bin's recommended nix-setup-systemd creates the
    # nixbld build users Nix expects. No package's service is started
    # (apt-install.sh says why).
    run_logged apt-install bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" "${missing[@]}"
}

install_garage() {
    # `garage --version` prints e.g. "garage cargo:2.5.0 [features: ...]".
    local version_pattern="(^|[^0-9.])${GARAGE_VERSION//./\\.}([^0-9.]|$)"
    if command -v garage >/dev/null && [[ $(garage --version 2>/dev/null) =~ $version_pattern ]]; then
        return 0
    fi
    command -v cargo >/dev/null || die "cargo is needed to build Garage"
    say "building Garage $GARAGE_VERSION from crates.io (about 15 minutes on 2 cores, once per machine)"
    local started=$SECONDS
    mkdir -p "$CACHE_DIR"
    run_logged garage cargo install garage --locked --version "$GARAGE_VERSION" \
        --target-dir "$CACHE_DIR/garage-build"
    say "Garage $GARAGE_VERSION installed in $((SECONDS - started)) s"
}

install_nextest() {
    command -v cargo-nextest >/dev/null && return 0
    command -v cargo >/dev/null || die "cargo is needed to install cargo-nextest"
    say "installing cargo-nextest from crates.io"
    run_logged nextest cargo install cargo-nextest --locked
}

# The current Nix: Debian sid's nix-bin in a chroot, with host-side
# wrappers. Skipped when the chroot's nix answers with the version expected.
install_current_nix() {
    local dir=$CACHE_DIR/nix-current
    local root=$dir/root
    if [[ ! -x $root/usr/bin/nix ]]; then
        install_current_nix_root "$dir" "$root"
    fi
    # The wrappers are written every time, so that a root installed by an
    # older version of this script gets the current ones.
    write_current_nix_wrappers "$dir" "$root"
    [[ $("$dir/bin/nix" --version 2>/dev/null) == "nix (Nix) 2."* ]] ||
        die "the current Nix under $dir does not run: $("$dir/bin/nix" --version 2>&1 | tail -n 1)"
}

install_current_nix_root() {
    local dir=$1 root=$2
    [[ $EUID -eq 0 ]] || die "a current Nix is missing; run as root to install it"
    package_installed debootstrap || {
        run_logged apt-update apt-get -q -y -o DPkg::Lock::Timeout=600 update
        run_logged apt-install bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" debootstrap
    }
    say "installing a current Nix (Debian sid's nix-bin) in a root under $dir (about 3 minutes)"
    local started=$SECONDS mirror
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
    mirror=${mirror:-http://deb.debian.org/debian}
    rm -rf "$root.new"
    mkdir -p "$dir"
    # (The mirror may serve a snapshot whose Release file is past its
    # Valid-Until on this machine's clock: apt inside is told not to mind.)
    # debootstrap fails at the end, leaving nix-bin unconfigured: its
    # libdbd-sqlite3-perl needs the virtual package perl-dbdabi-94, which
    # apt inside the root then resolves. Any other failure leaves no apt.
    debootstrap --variant=minbase --include=nix-bin,ca-certificates \
        sid "$root.new" "$mirror" >"$log_dir/debootstrap.log" 2>&1 || true
    if [[ ! -x $root.new/usr/bin/apt-get ]]; then
        say "error: debootstrap of Debian sid failed; last lines of its output:"
        tail -n 40 "$log_dir/debootstrap.log" | sed 's/^/    /' >&2
        exit 1
    fi
    run_logged nix-configure chroot "$root.new" /bin/sh -c "
        echo 'deb $mirror sid main' > /etc/apt/sources.list &&
        apt-get -q -o Acquire::Check-Valid-Until=false update &&
        DEBIAN_FRONTEND=noninteractive apt-get -q -y install -f &&
        DEBIAN_FRONTEND=noninteractive apt-get -q -y install nix-bin libdbi-perl && apt-get clean"
    # A root made by an older version of this script may still have the
    # host's /tmp and /dev mounted inside: those go first, and nothing is
    # deleted while any is still there.
    local mount
    for mount in tmp dev proc; do
        ! mountpoint -q "$root/$mount" || umount -R "$root/$mount" ||
            die "could not unmount $root/$mount; unmount it, then run this again"
    done
    rm -rf "$root"
    mv "$root.new" "$root"
    say "current Nix installed in $((SECONDS - started)) s"
}

# bin/nix-chroot runs the current Nix's program named as it is called (a
# symlink per program) inside the root next to bin/, in a mount namespace of
# its own whose root the root is made with pivot_root, not chroot: the
# kernel refuses user namespaces to a chrooted process, and Nix's build
# sandbox needs one. A user other than root gets a user namespace too, in
# which it is root (mapped to itself): the agent's own user in the suite.
# /proc, /dev and /tmp (where the tests' stores are) are the host's; so are
# the directories NIX_CHROOT_SHARE names (colon-separated, at the same
# paths), for a post-build-hook and the programs it runs. Nothing is
# mounted on the host: the mounts end with the program. The root is found
# from the wrapper's own path, so that the directory may also be reached
# through a bind mount (root's home is closed to other users).
write_current_nix_wrappers() {
    local dir=$1 root=$2
    mkdir -p "$dir/bin" "$root/.host"
    cat >"$dir/bin/nix-chroot.new" <<'WRAPPER'
#!/bin/sh
# Written by ops/install.sh (write_current_nix_wrappers), which says why.
wrapper=$(readlink -f "$0") || exit 1
root=${wrapper%/bin/*}/root
if [ "$(id -u)" -eq 0 ]; then
    namespaces=--mount
else
    namespaces='--user --map-root-user --mount'
fi
# shellcheck disable=SC2086 # the namespaces are separate words
exec unshare $namespaces --propagation private /bin/sh -e -c '
root=$1 program=$2 cwd=$3
shift 3
mount --bind "$root" "$root"
mount --rbind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /tmp "$root/tmp"
IFS=:
for shared in ${NIX_CHROOT_SHARE:-}; do
    [ -n "$shared" ] || continue
    mkdir -p "$root$shared"
    mount --rbind "$shared" "$root$shared"
done
unset IFS
cd "$root"
pivot_root . .host
# (In a user namespace the host mounts are locked in place: they stay.)
umount -l /.host 2>/dev/null || true
cd "$cwd" 2>/dev/null || cd /
PATH=/usr/bin:/bin exec "$program" "$@"' \
    nix-chroot "$root" "/usr/bin/$(basename "$0")" "$PWD" "$@"
WRAPPER
    chmod 755 "$dir/bin/nix-chroot.new"
    mv "$dir/bin/nix-chroot.new" "$dir/bin/nix-chroot"
    local program
    for program in nix nix-store nix-build nix-instantiate nix-env nix-hash nix-daemon; do
        ln -sf nix-chroot "$dir/bin/$program"
    done
}

install_debian_packages
install_garage
install_nextest
install_current_nix
