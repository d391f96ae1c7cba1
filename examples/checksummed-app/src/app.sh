#!/bin/sh
# app greet NAME | version | verify
set -eu
. "$APP_HOME/lib/greet.sh"
case "${1:-}" in
    greet) greet "${2:-stranger}" ;;
    version) echo "app $APP_VERSION (libgreet $LIBGREET_VERSION)" ;;
    verify) cd "$APP_HOME" && sha256sum -c SHA256SUMS >/dev/null && echo "OK: $(wc -l < SHA256SUMS) files match" ;;
    *) echo "usage: app greet NAME | version | verify" >&2; exit 2 ;;
esac
