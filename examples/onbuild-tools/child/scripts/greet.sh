#!/bin/sh
for name in "$@"; do
    echo "hello, $name"
done
