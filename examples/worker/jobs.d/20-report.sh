# what the previous run left behind
ls "$SPOOL/done"
