#!/bin/sh
# Squid external ACL helper: answers OK when the TLS ClientHello carried an SNI, ERR otherwise.
# Squid sends one line per lookup: the %ssl::>sni value, or "-" when the client sent none.
while read -r sni rest; do
    if [ -z "$sni" ] || [ "$sni" = "-" ]; then
        echo ERR
    else
        echo OK
    fi
done
