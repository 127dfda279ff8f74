# Squid external ACL helper: is the TLS ClientHello's SNI on the allowlist?
#   awk -f sni_allowlisted.awk ALLOWLIST_FILE      then one %ssl::>sni value per line on stdin ("-" = none)
# Answers OK or ERR, one line per lookup, in order.
#
# Why a helper and not Squid's ssl::server_name ACL: that ACL would load the whole allowlist a second time in
# every Squid parse (the candidate check, the master and each worker); at 100k entries each load costs seconds.
# Squid restarts helpers on every reconfigure, so this always reads the active list. awk, because it is on
# every Debian system (mawk is Essential) and any user can run it, whatever interpreter runs the supervisor.
#
# The allowlist file is the rendered, validated, minimal list: "example.com" is that host, ".example.com" the
# domain and every subdomain (Squid's dstdomain semantics). entrypoint/tests/test_sni_helper.py checks that
# this agrees with the policy module's Allowlist.allows on the same cases.
BEGIN {
    while ((getline entry < ARGV[1]) > 0)
        if (entry != "")
            allowed[entry] = 1
    close(ARGV[1])
    ARGV[1] = ""    # the main loop reads stdin
}
{
    host = tolower($1)
    sub(/\.$/, "", host)
    verdict = "ERR"
    if (host != "" && host != "-") {
        if (host in allowed) {
            verdict = "OK"
        } else {
            name = "." host
            while (name != "") {
                if (name in allowed) {
                    verdict = "OK"
                    break
                }
                rest = substr(name, 2)
                dot = index(rest, ".")
                name = dot ? substr(rest, dot) : ""
            }
        }
    }
    print verdict
    fflush()
}
