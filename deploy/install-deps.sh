#!/usr/bin/env bash
# Installs what the service (run), the test suite (test) or the benchmarks (bench) need on a fresh
# Debian machine: OS packages through apt-get, Postfix's smtp-source/smtp-sink
# unpacked (not installed) under .tools/, and the Python packages in .venv.
# Safe to re-run: each step is skipped when its result is already there.
set -euo pipefail
mode=${1:-run}
bench=""
if [ "$mode" = bench ]; then  # the benchmarks: the test set plus their peer tools
  mode=test
  bench=1
fi
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; fi
fi

need_pkgs=()
want() { dpkg -s "$1" >/dev/null 2>&1 || need_pkgs+=("$1"); }
want redis-server
if [ "$mode" = test ]; then
  want dovecot-imapd
  want chromium
  want bind9
  want bind9-dnsutils
  want slapd       # tests/slapd.py: a private OpenLDAP for `provision --ldap-url`
  want ldap-utils
  want wrk  # HTTP load generator of bench/web_load.py
  want prometheus  # promtool: tests/test_alert_rules.py checks deploy/prometheus/fallback.rules.yml
  command -v npm >/dev/null || want npm  # axe-core for tests/test_web_a11y.py
fi
if [ -n "$bench" ]; then
  # bench/reconcile.py's peer: imapsync where Debian packages it (Debian 12 does not), else
  # mbsync from isync, the packaged IMAP-to-IMAP copier it falls back to.
  want isync
  want valgrind  # callgrind: bench/smtp_instructions.py counts instructions, not seconds
  if apt-cache show imapsync >/dev/null 2>&1; then want imapsync; fi
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "install-deps: need ${need_pkgs[*]} but there is no apt-get; install them by hand" >&2
    exit 1
  fi
  echo "install-deps: apt-get install ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need_pkgs[@]}" >/dev/null
  # Debian starts the packaged daemons; the project runs its own instances.
  for svc in redis-server dovecot named slapd prometheus; do
    $SUDO systemctl stop "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

if [ "$mode" = test ] && [ ! -x .tools/postfix/usr/sbin/smtp-sink ]; then
  # Postfix's load generator and sink, unpacked from the Debian package: the
  # mail service itself is never installed; tests/test_postfix_relay.py runs
  # its daemons from here, with a private config and queue, as a perimeter MTA.
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download postfix >/dev/null 2>&1)
  mkdir -p .tools/postfix
  dpkg -x "$tmp"/postfix_*.deb .tools/postfix
  rm -rf "$tmp"
  # Their shared libraries come in the same package; say so if the system lacks one of theirs.
  missing=$(LD_LIBRARY_PATH=.tools/postfix/usr/lib/postfix ldd .tools/postfix/usr/sbin/smtp-sink \
    | awk '/not found/ {print $1}')
  if [ -n "$missing" ]; then
    echo "install-deps: smtp-sink lacks $missing" >&2
  fi
fi

AXE_VERSION=4.10.2  # pinned: its rules decide what tests/test_web_a11y.py calls a violation
if [ "$mode" = test ] && [ ! -f ".tools/axe/node_modules/axe-core/axe.min.js" ]; then
  mkdir -p .tools/axe
  npm install --silent --no-audit --no-fund --prefix .tools/axe "axe-core@$AXE_VERSION" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extra=""
[ "$mode" = test ] && extra="[test]"
stamp=".venv/.installed-$mode"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".$extra"
  touch "$stamp"
fi

# The webmail's languages: the .mo files are built here from the .po files in the repository
# (not committed); without them the webmail is English.
.venv/bin/pybabel compile -d web/translations >/dev/null
