#!/bin/sh
# Python and its PostgreSQL driver from Debian, and the app's own user.
set -e
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3-psycopg2 >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/*
useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin shop
