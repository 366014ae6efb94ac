# Shared set-up for scripts/demo and scripts/test: a venv in .venv with groupgate installed.
# Sourced, not run. Installs Debian packages only when run as root and they are missing.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
    # apt_install PKG... : install the Debian packages that are missing (root only).
    local missing=()
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
        return 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Packages must never start system-wide servers here (slapd on all interfaces, smbd, ...):
    # the tests start their own on loopback. /etc/ldap/noslapd stops the slapd init script;
    # a temporary policy-rc.d (exit 101) stops every other service start during the install.
    mkdir -p /etc/ldap && touch /etc/ldap/noslapd
    local made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
        # never leave the host refusing every service start if the install is interrupted
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT INT TERM
    fi
    if [ -z "${GROUPGATE_APT_UPDATED:-}" ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
        export GROUPGATE_APT_UPDATED=1
    fi
    local rc=0
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT INT TERM; fi
    return $rc
}

ensure_venv() {
    # ensure_venv EXTRAS : .venv with groupgate[EXTRAS] installed; re-installs when pyproject changes.
    local extras="$1"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then apt_install python3-venv; fi
    if [ ! -x "$PY" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.groupgate-$extras-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        say "installing groupgate[$extras] into $VENV"
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >"$VENV/pip.log" 2>&1 || true
        if ! "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[$extras]" >>"$VENV/pip.log" 2>&1 \
           || ! "$PY" -c 'import daemon.cli'; then
            cat "$VENV/pip.log" >&2
            say "installing groupgate failed (log above, also in $VENV/pip.log)"
            return 1
        fi
        touch "$stamp"
    fi
}

ensure_postgres() {
    # Start the local PostgreSQL cluster if it is installed but down (root only).
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        say "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
        for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 0.1; done
    fi
    say "PostgreSQL is not reachable at 127.0.0.1:5432: its tests will skip (or fail with CI=true)"
}
