#!/bin/sh
# copy a directory to a dated tarball
tar -czf "/tmp/backup-$(date +%F).tar.gz" "${1:?usage: backup.sh DIR}"
