# how full the spool's filesystem is
df -k "$SPOOL" | tail -n 1
