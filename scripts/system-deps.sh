#!/usr/bin/env bash
# System packages the integration tests need (Prometheus scrapes the server in tests/).
set -euo pipefail
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian package prometheus ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    # The Debian package starts a system service on :9090; the tests run their own instance.
    (systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus) >/dev/null 2>&1 || true
  else
    echo "warning: 'prometheus' is not installed and cannot be installed here (need root + apt-get)" >&2
  fi
fi
