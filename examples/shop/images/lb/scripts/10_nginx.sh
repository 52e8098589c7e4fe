#!/bin/sh
# Stock nginx from Debian; its packaged nginx.conf stays as it is.
set -e
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/*
# The packaged site would also listen on port 80; the shop's is in conf.d.
rm -f /etc/nginx/sites-enabled/default
# The root is read-only: the packaged log paths lead to the server's log.
ln -sf /dev/stdout /var/log/nginx/access.log
ln -sf /dev/stderr /var/log/nginx/error.log
# nginx creates its temporary directories at start, as root; the root is
# read-only then, so they are made now, as nginx would make them.
for d in body fastcgi proxy scgi uwsgi; do
    install -d -o www-data -g www-data -m 0700 /var/lib/nginx/$d
done
