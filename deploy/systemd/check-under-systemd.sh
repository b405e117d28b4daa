#!/usr/bin/env bash
# Run deploy/systemd/streamwatch.service, hardening and all, under a real systemd and check
# what an operator relies on: it starts (Type=notify: active only after READY=1), reads its
# secrets from LoadCredential=, serves /readyz, stores callbacks in its StateDirectory, reloads
# on `systemctl reload`, is restarted by the watchdog when its event loop is frozen, and stops
# cleanly; `systemd-analyze verify` and `systemd-analyze security` pass inside.
#
# How: this machine's root file system, behind a throwaway overlay, booted as a container by
# systemd-nspawn; streamwatch is pip-installed from this checkout into /opt/streamwatch there,
# with the shipped unit and deploy/systemd/streams.toml (backend switched to the built-in
# emulator: no network). Needs root, and installs systemd-container if it is missing.
# Usage: deploy/systemd/check-under-systemd.sh
# Exit 0: every check passed. 1: a check failed. 2: this machine cannot run the check (not root,
# no overlay or tmpfs mounts, systemd does not boot in a container); the reason is printed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
unit="${STREAMWATCH_UNIT:-$repo/deploy/systemd/streamwatch.service}"   # override to try a variant
max_exposure=2.0

cannot() { printf 'check-under-systemd: cannot run here: %s\n' "$*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || cannot "needs root (systemd-nspawn)"
if ! command -v systemd-nspawn >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        systemd-container >/dev/null
fi

work="$(mktemp -d /var/tmp/streamwatch-nspawn.XXXXXX)"
root="$work/root"
nspawn_pid=""
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true   # nspawn powers the container off
        for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    umount "$root" 2>/dev/null || true
    umount "$work/upper" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; [ -n "${leader:-}" ] && inside journalctl -u streamwatch --no-pager -n 40 >&2 || true; exit 1; }

# A copy-on-write view of / to boot: nothing the container does reaches this machine.
mkdir -p "$work/upper" "$work/work" "$root"
mount -t tmpfs tmpfs "$work/upper" || cannot "no tmpfs mount"
mkdir -p "$work/upper/u" "$work/upper/w"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper/u,workdir=$work/upper/w" "$root" ||
    cannot "no overlay mount of /"
systemd-id128 new >"$root/etc/machine-id"          # nspawn refuses the host's own id
# nspawn keeps per-container state here; it must be a file system it may clean.
if ! mountpoint -q /run/systemd/nspawn 2>/dev/null; then
    mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn ||
        cannot "no tmpfs at /run/systemd/nspawn"
fi
nspawn=(systemd-nspawn -q -D "$root" --keep-unit --register=no --link-journal=no)

"${nspawn[@]}" --pipe /bin/true || cannot "systemd-nspawn cannot start a container"

step "install streamwatch into /opt/streamwatch (the system Python, as the unit expects)"
"${nspawn[@]}" --pipe --bind-ro="$repo:/src" /bin/sh -ec '
    rm -rf /opt/streamwatch
    /usr/bin/python3 -m venv /opt/streamwatch
    cp -r /src /tmp/streamwatch-src && rm -rf /tmp/streamwatch-src/.venv
    /opt/streamwatch/bin/pip install --quiet --disable-pip-version-check /tmp/streamwatch-src 2>&1 |
        grep -v "^WARNING: Location" || true
    test -x /opt/streamwatch/bin/streamwatch'

step "install the unit, the config (emulator backend) and the credentials"
install -d -m 0755 "$root/etc/streamwatch"
install -d -m 0700 "$root/etc/streamwatch/credentials"
sed 's/^backend = "mavi"/backend = "emulator"/' "$repo/deploy/systemd/streams.toml" \
    >"$root/etc/streamwatch/streams.toml"
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' \
    >"$root/etc/streamwatch/credentials/callback_secret"
echo "not-a-real-key" >"$root/etc/streamwatch/credentials/mavi_api_key"
chmod 0600 "$root"/etc/streamwatch/credentials/*
install -m 0644 "$unit" "$root/etc/systemd/system/streamwatch.service"
# A short watchdog for the freeze check below; everything else is the shipped unit.
install -d "$root/etc/systemd/system/streamwatch.service.d"
printf '[Service]\nWatchdogSec=4\nRestartSec=1\n' \
    >"$root/etc/systemd/system/streamwatch.service.d/check.conf"
# Only what the check needs comes up in the container.
ln -sf /dev/null "$root/etc/systemd/system/getty@.service"
ln -sf /dev/null "$root/etc/systemd/system/console-getty.service"

step "boot systemd in the container"
"${nspawn[@]}" --boot -- systemd.unit=basic.target >"$work/boot.log" 2>&1 &
nspawn_pid=$!
leader=""
for _ in $(seq 100); do
    leader="$(pgrep -P "$nspawn_pid" -x systemd || true)"
    [ -n "$leader" ] && break
    sleep 0.2
done
[ -n "$leader" ] || { cat "$work/boot.log" >&2; cannot "systemd does not boot in a container"; }
inside() { nsenter -t "$leader" -a "$@"; }
for _ in $(seq 150); do
    state="$(inside systemctl is-system-running 2>/dev/null || true)"
    case "$state" in running | degraded) break ;; esac
    sleep 0.2
done
echo "container systemd: $state"

step "systemd-analyze verify"
# verify exits 0 on settings it ignores (a misspelt value); only silence is a pass.
verify="$(inside systemd-analyze verify /etc/systemd/system/streamwatch.service 2>&1)" ||
    fail "systemd-analyze verify rejected the unit: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"

step "systemd-analyze security (threshold $max_exposure)"
inside systemd-analyze security --no-pager streamwatch.service | tail -1
exposure="$(inside systemd-analyze security --no-pager streamwatch.service |
    sed -n 's/.*Overall exposure level for streamwatch.service: \([0-9.]*\).*/\1/p')"
awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e != "" && e <= m) }' ||
    fail "exposure $exposure is above $max_exposure"

step "start: active only after READY=1, /readyz answers"
inside systemctl start streamwatch || fail "systemctl start failed"
[ "$(inside systemctl show -P ActiveState streamwatch)" = active ] || fail "not active"
inside python3 -c '
import json, sys, time, urllib.request
for _ in range(50):
    try:
        body = json.load(urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=2))
        sys.exit(0 if body["ready"] else 1)
    except OSError:
        time.sleep(0.2)
sys.exit(1)' || fail "/readyz did not answer ready"

step "callbacks are stored in the StateDirectory; STATUS= reaches systemd"
stored=0
for _ in $(seq 60); do
    status="$(inside systemctl show -P StatusText streamwatch)"
    case "$status" in "1/1 streams running, last callback"*) stored=1; break ;; esac
    sleep 0.5
done
echo "StatusText: $status"
[ "$stored" = 1 ] || fail "no callback reached the daemon"
inside test -s /var/lib/private/streamwatch/streamwatch.db || fail "no state file"

step "reload (SIGHUP, RELOADING=1/READY=1)"
pid_before="$(inside systemctl show -P MainPID streamwatch)"
inside systemctl reload streamwatch || fail "reload failed"
[ "$(inside systemctl show -P MainPID streamwatch)" = "$pid_before" ] || fail "reload restarted"
[ "$(inside systemctl show -P ActiveState streamwatch)" = active ] || fail "not active after reload"

step "a frozen event loop is restarted by the watchdog"
inside kill -STOP "$pid_before"
restarted=0
for _ in $(seq 60); do
    pid_now="$(inside systemctl show -P MainPID streamwatch)"
    if [ "$pid_now" != "$pid_before" ] && [ "$pid_now" != 0 ] &&
        [ "$(inside systemctl show -P ActiveState streamwatch)" = active ]; then
        restarted=1
        break
    fi
    sleep 0.5
done
[ "$restarted" = 1 ] || fail "the watchdog did not restart the frozen daemon"
# The journal is read whole first: `journalctl | grep -q` fails under pipefail when grep stops
# reading early (journalctl gets SIGPIPE).
journal="$(inside journalctl -u streamwatch --no-pager)"
grep -q "Watchdog timeout" <<<"$journal" || fail "the restart was not the watchdog's"
echo "restarted by the watchdog: pid $pid_before -> $pid_now"

step "stop: clean exit, nothing denied by the sandbox"
inside systemctl stop streamwatch
[ "$(inside systemctl show -P Result streamwatch)" = success ] || fail "stop did not succeed"
journal="$(inside journalctl -u streamwatch --no-pager)"
if grep -iE "permission denied|operation not permitted|seccomp" <<<"$journal"; then
    fail "the sandbox denied something (above)"
fi
grep -q '"app.stopped"' <<<"$journal" || fail "no app.stopped"

echo "check-under-systemd: all checks passed"
