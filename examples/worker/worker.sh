#!/bin/sh
# worker --once | --loop: run every job in /etc/worker/jobs.d, log each to $SPOOL/done, every $INTERVAL seconds.
set -u
run_jobs() {
    count=0
    for job in /etc/worker/jobs.d/*.sh; do
        name=$(basename "$job" .sh)
        if sh "$job" > "$SPOOL/done/$name.log" 2>&1; then status=ok; else status=failed; fi
        echo "worker: $name $status"
        count=$((count + 1))
    done
    touch "$SPOOL/heartbeat"
    echo "worker: ran $count jobs as $(id -un)($(id -u))"
}
trap 'echo "worker: stopping"; exit 0' INT TERM
case "${1:---loop}" in
    --once) run_jobs ;;
    --loop) while true; do run_jobs; sleep "$INTERVAL" & wait $!; done ;;
    *) echo "usage: worker --once | --loop" >&2; exit 2 ;;
esac
