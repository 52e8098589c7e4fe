#!/bin/sh
# PostgreSQL 15 from Debian. Its cluster is created by db-start, on the
# server's volume, not in the image.
set -e
mkdir -p /etc/postgresql-common/createcluster.d
echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/kiln.conf
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/*
# The volume's mount point: the volume takes its owner and mode.
install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
