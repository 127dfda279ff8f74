/*
 * sni_helper.c: the compiled twin of sni_helper.py, Squid's external ACL helper for the strict SNI check.
 *
 * sni_helper.py is the reference model: this program must give the same answer for every input line and every
 * set of list files, and tests/.../test_sni_helper_differential.py checks that over generated and mutated
 * ClientHellos. Read sni_helper.py for the why of each rule; this file only mirrors it, step by step:
 *
 *   line      "<channel-id> <handshake> <policy>", split on whitespace (a missing field is empty)
 *   handshake "" or "-"                                    -> missing
 *             URL-unquote, then strict base64 (Python's binascii.a2b_base64(strict_mode=True) of 3.11),
 *             any byte >= 0x80 after unquoting            -> malformed
 *   records   TLS handshake records -> one ClientHello     (client_hello())
 *   hello     exactly one server_name extension holding exactly one host_name, no repeated extension
 *             (server_names()); none at all                -> missing
 *   name      ASCII, lower-cased, one trailing dot dropped, LDH labels of 1-63 octets, <= 253 octets, last label
 *             not all digits (host_name())                -> malformed otherwise
 *   lists     on the policy's deny list                    -> denied
 *             not on its allow list                        -> not_allowlisted
 *
 * Answers "<id> OK" or "<id> ERR sni_verdict=<verdict>". Why compiled: Squid cannot cache these lookups (the key
 * holds the ClientHello's random bytes), so every new HTTPS connection waits for one; a Python process costs about
 * 230 us of CPU per lookup, this one a few. It reads whatever Squid has sent, answers all complete lines, and writes
 * the answers in one write(): with concurrency= in squid.conf, several lookups share one wake-up.
 *
 * Build: gcc -O2 -o sni_helper sni_helper.c (C99 and POSIX only; scripts/build-sni-helper).
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HANDSHAKE_RECORD 22
#define CLIENT_HELLO 1
#define SERVER_NAME_EXTENSION 0
#define HOST_NAME_TYPE 0
#define MAX_HELLO (64 * 1024)
#define MAX_NAME_OCTETS 253

enum verdict { PASS, MISSING, MALFORMED, DENIED, NOT_ALLOWLISTED };
static const char *const VERDICT_TEXT[] = {"OK", "ERR sni_verdict=missing", "ERR sni_verdict=malformed",
                                           "ERR sni_verdict=denied", "ERR sni_verdict=not_allowlisted"};

static void *xrealloc(void *old, size_t size) {
    void *p = realloc(old, size ? size : 1);
    if (!p) {
        fputs("sni_helper: out of memory\n", stderr);
        exit(1);
    }
    return p;
}

/* --- a set of byte strings (one policy's allow or deny list) ------------------------------------------------ */
struct set {
    char **keys;
    size_t *lens;
    size_t slots, used;
};

static uint64_t hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

static int set_has(const struct set *set, const char *s, size_t n) {
    if (!set->slots) return 0;
    for (size_t i = hash(s, n) & (set->slots - 1);; i = (i + 1) & (set->slots - 1)) {
        if (!set->keys[i]) return 0;
        if (set->lens[i] == n && memcmp(set->keys[i], s, n) == 0) return 1;
    }
}

static void set_add(struct set *set, const char *s, size_t n) {
    if ((set->used + 1) * 2 > set->slots) {
        struct set bigger = {NULL, NULL, set->slots ? set->slots * 2 : 64, 0};
        bigger.keys = xrealloc(NULL, bigger.slots * sizeof *bigger.keys);
        bigger.lens = xrealloc(NULL, bigger.slots * sizeof *bigger.lens);
        memset(bigger.keys, 0, bigger.slots * sizeof *bigger.keys);
        for (size_t i = 0; i < set->slots; i++)
            if (set->keys[i]) {
                size_t j = hash(set->keys[i], set->lens[i]) & (bigger.slots - 1);
                while (bigger.keys[j]) j = (j + 1) & (bigger.slots - 1);
                bigger.keys[j] = set->keys[i];
                bigger.lens[j] = set->lens[i];
                bigger.used++;
            }
        free(set->keys);
        free(set->lens);
        *set = bigger;
    }
    if (set_has(set, s, n)) return;
    size_t i = hash(s, n) & (set->slots - 1);
    while (set->keys[i]) i = (i + 1) & (set->slots - 1);
    set->keys[i] = xrealloc(NULL, n);
    memcpy(set->keys[i], s, n);
    set->lens[i] = n;
    set->used++;
}

/* Python's str.strip() and str.split() whitespace, within ASCII. */
static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

/* load_allowlist(): every stripped, non-empty line. Lines end at '\n', '\r' or "\r\n" (Python's universal
 * newlines when it reads a file in text mode). */
static void load_list(struct set *set, const char *path) {
    FILE *file = fopen(path, "rb");
    if (!file) {
        fprintf(stderr, "sni_helper: cannot read %s: %s\n", path, strerror(errno));
        exit(1);
    }
    char *text = NULL;
    size_t size = 0, cap = 0, got;
    do {
        if (size + 65536 > cap) text = xrealloc(text, cap = (size + 65536) * 2);
        got = fread(text + size, 1, cap - size, file);
        size += got;
    } while (got > 0);
    if (ferror(file)) {
        fprintf(stderr, "sni_helper: cannot read %s: %s\n", path, strerror(errno));
        exit(1);
    }
    fclose(file);
    size_t start = 0;
    for (size_t i = 0; i <= size; i++) {
        if (i < size && text[i] != '\n' && text[i] != '\r') continue;
        size_t a = start, b = i;
        while (a < b && is_space((unsigned char)text[a])) a++;
        while (b > a && is_space((unsigned char)text[b - 1])) b--;
        if (b > a) set_add(set, text + a, b - a);
        start = i + 1;
    }
    free(text);
}

struct policy {
    char *name;
    size_t len;
    struct set allow, deny;
};
static struct policy *policies;
static size_t policy_count;

static struct policy *find_policy(const char *name, size_t len, int create) {
    for (size_t i = 0; i < policy_count; i++)
        if (policies[i].len == len && memcmp(policies[i].name, name, len) == 0) return &policies[i];
    if (!create) return NULL;
    policies = xrealloc(policies, (policy_count + 1) * sizeof *policies);
    struct policy *p = &policies[policy_count++];
    memset(p, 0, sizeof *p);
    p->name = xrealloc(NULL, len);
    memcpy(p->name, name, len);
    p->len = len;
    return p;
}

/* load_policies(): POLICY_DIR's "<name>.allow" and "<name>.deny" files. */
static void load_policies(const char *directory) {
    DIR *dir = opendir(directory);
    if (!dir) {
        fprintf(stderr, "sni_helper: cannot read %s: %s\n", directory, strerror(errno));
        exit(1);
    }
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        const char *dot = strrchr(entry->d_name, '.');
        if (!dot || (strcmp(dot + 1, "allow") != 0 && strcmp(dot + 1, "deny") != 0)) continue;
        size_t pathlen = strlen(directory) + strlen(entry->d_name) + 2;
        char *path = xrealloc(NULL, pathlen);
        snprintf(path, pathlen, "%s/%s", directory, entry->d_name);
        struct policy *p = find_policy(entry->d_name, (size_t)(dot - entry->d_name), 1);
        load_list(strcmp(dot + 1, "allow") == 0 ? &p->allow : &p->deny, path);
        free(path);
    }
    closedir(dir);
}

/* --- the handshake field: URL-unquote, then strict base64 ---------------------------------------------------- */
static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* urllib.parse.unquote(), then base64.b64decode(validate=True). Python rejects a non-ASCII string before decoding
 * (ValueError), which is what any byte >= 0x80 becomes after unquoting. Returns the decoded length, or -1. */
static long decode_handshake(const char *in, size_t n, unsigned char *out) {
    static signed char table[256];
    static int ready;
    if (!ready) {
        const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        memset(table, -1, sizeof table);
        for (int i = 0; i < 64; i++) table[(unsigned char)alphabet[i]] = (signed char)i;
        ready = 1;
    }
    /* Unquote into a scratch copy first: base64's "excess data" rule looks at what follows. */
    unsigned char *text = xrealloc(NULL, n);
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c == '%' && i + 2 < n && hex_value((unsigned char)in[i + 1]) >= 0 &&
            hex_value((unsigned char)in[i + 2]) >= 0) {
            c = (unsigned char)(hex_value((unsigned char)in[i + 1]) * 16 + hex_value((unsigned char)in[i + 2]));
            i += 2;
        }
        if (c >= 0x80) {
            free(text);
            return -1;
        }
        text[len++] = c;
    }
    /* CPython 3.11 binascii.a2b_base64 with strict_mode=1, rule for rule. */
    long written = -1;
    int quad_pos = 0, pads = 0, padding_started = 0;
    unsigned leftchar = 0;
    unsigned char *o = out;
    if (len > 0 && text[0] == '=') goto done; /* leading padding */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = text[i];
        if (c == '=') {
            padding_started = 1;
            if (quad_pos >= 2 && quad_pos + ++pads >= 4) {
                if (i + 1 < len) goto done; /* excess data after padding */
                written = o - out;
                goto done;
            }
            continue;
        }
        int v = table[c];
        if (v < 0) goto done;            /* only base64 data is allowed */
        if (padding_started) goto done; /* discontinuous padding */
        pads = 0;
        switch (quad_pos) {
        case 0: quad_pos = 1; leftchar = (unsigned)v; break;
        case 1: quad_pos = 2; *o++ = (unsigned char)((leftchar << 2) | ((unsigned)v >> 4)); leftchar = v & 0x0f; break;
        case 2: quad_pos = 3; *o++ = (unsigned char)((leftchar << 4) | ((unsigned)v >> 2)); leftchar = v & 0x03; break;
        default: quad_pos = 0; *o++ = (unsigned char)((leftchar << 6) | (unsigned)v); leftchar = 0; break;
        }
    }
    if (quad_pos == 0) written = o - out; /* otherwise: incorrect padding, or one data character too many */
done:
    free(text);
    return written;
}

/* --- the ClientHello ------------------------------------------------------------------------------------------ */
static size_t number(const unsigned char *p, int width) {
    size_t v = 0;
    for (int i = 0; i < width; i++) v = (v << 8) | p[i];
    return v;
}

/* client_hello(): the handshake message body from the records, or NULL (malformed). */
static const unsigned char *client_hello(const unsigned char *records, size_t n, unsigned char *fragments,
                                         size_t *hello_len) {
    size_t offset = 0, have = 0;
    while (offset < n) {
        if (n - offset < 5) return NULL;
        size_t length = number(records + offset + 3, 2);
        if (records[offset] != HANDSHAKE_RECORD || records[offset + 1] != 3) return NULL;
        if (n - offset - 5 < length) return NULL;
        memcpy(fragments + have, records + offset + 5, length);
        have += length;
        offset += 5 + length;
        if (have >= 4 && have >= 4 + number(fragments + 1, 3)) break;
    }
    if (have < 4 || fragments[0] != CLIENT_HELLO) return NULL;
    size_t length = number(fragments + 1, 3);
    if (length > MAX_HELLO || have < 4 + length) return NULL;
    *hello_len = length;
    return fragments + 4;
}

struct reader {
    const unsigned char *data;
    size_t len, offset;
};

static int take(struct reader *r, size_t count, const unsigned char **out) {
    if (r->len - r->offset < count) return 0;
    if (out) *out = r->data + r->offset;
    r->offset += count;
    return 1;
}

static int read_number(struct reader *r, int width, size_t *value) {
    const unsigned char *p;
    if (!take(r, (size_t)width, &p)) return 0;
    *value = number(p, width);
    return 1;
}

static int vector(struct reader *r, int width, struct reader *inner) {
    size_t length;
    const unsigned char *p;
    if (!read_number(r, width, &length) || !take(r, length, &p)) return 0;
    if (inner) *inner = (struct reader){p, length, 0};
    return 1;
}

/* server_names() and _server_name_list(): 1 with the one host_name, 0 for no SNI extension, -1 malformed. */
static int server_name(const unsigned char *hello, size_t n, const unsigned char **name, size_t *name_len) {
    struct reader r = {hello, n, 0}, extensions, data;
    if (!take(&r, 2 + 32, NULL) || !vector(&r, 1, NULL) || !vector(&r, 2, NULL) || !vector(&r, 1, NULL))
        return -1;
    if (r.offset == r.len) return 0;
    if (!vector(&r, 2, &extensions) || r.offset != r.len) return -1;
    static unsigned char seen[65536 / 8];
    memset(seen, 0, sizeof seen);
    int found = 0;
    while (extensions.offset != extensions.len) {
        size_t kind;
        if (!read_number(&extensions, 2, &kind) || !vector(&extensions, 2, &data)) return -1;
        if (seen[kind / 8] & (1u << (kind % 8))) return -1;
        seen[kind / 8] |= (unsigned char)(1u << (kind % 8));
        if (kind != SERVER_NAME_EXTENSION) continue;
        struct reader entries;
        if (!vector(&data, 2, &entries) || data.offset != data.len) return -1;
        int names = 0;
        while (entries.offset != entries.len) {
            size_t type;
            struct reader one;
            if (!read_number(&entries, 1, &type) || !vector(&entries, 2, &one)) return -1;
            if (type != HOST_NAME_TYPE) return -1;
            names++;
            *name = one.data;
            *name_len = one.len;
        }
        if (names != 1) return -1;
        found = 1;
    }
    return found;
}

/* host_name(): the lower-cased host name into out (at most 253 octets), its length, or -1 (malformed). */
static long host_name(const unsigned char *raw, size_t n, char *out) {
    for (size_t i = 0; i < n; i++)
        if (raw[i] >= 0x80) return -1;
    if (n > 0 && raw[n - 1] == '.') n--;
    if (n == 0 || n > MAX_NAME_OCTETS) return -1;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        char c = (char)raw[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        out[i] = c;
        if (c == '.') {
            if (label == 0 || out[i - 1] == '-') return -1;
            label = 0;
        } else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c == '-' && label > 0)) {
            if (++label > 63) return -1;
        } else {
            return -1;
        }
    }
    if (out[n - 1] == '-') return -1;
    size_t last = n;
    while (last > 0 && out[last - 1] != '.') last--;
    int digits = 1;
    for (size_t i = last; i < n; i++) digits &= out[i] >= '0' && out[i] <= '9';
    return digits ? -1 : (long)n;
}

/* allowlisted(): the name itself, or ".<suffix>" for the name and each of its parent domains. */
static int allowlisted(const char *name, size_t n, const struct set *set) {
    char dotted[MAX_NAME_OCTETS + 2];
    dotted[0] = '.';
    memcpy(dotted + 1, name, n);
    if (set_has(set, name, n)) return 1;
    for (size_t i = 0; i <= n; i++)
        if (dotted[i] == '.' && set_has(set, dotted + i, n + 1 - i)) return 1;
    return 0;
}

static enum verdict verdict(const char *handshake, size_t n, const char *policy, size_t policy_len) {
    if (n == 0 || (n == 1 && handshake[0] == '-')) return MISSING;
    unsigned char *records = xrealloc(NULL, n), *fragments = xrealloc(NULL, n);
    enum verdict result = MALFORMED;
    long len = decode_handshake(handshake, n, records);
    const unsigned char *hello, *raw = NULL;
    size_t hello_len = 0, raw_len = 0;
    char name[MAX_NAME_OCTETS + 1];
    if (len < 0 || !(hello = client_hello(records, (size_t)len, fragments, &hello_len))) goto out;
    int found = server_name(hello, hello_len, &raw, &raw_len);
    if (found <= 0) {
        result = found == 0 ? MISSING : MALFORMED;
        goto out;
    }
    long name_len = host_name(raw, raw_len, name);
    if (name_len < 0) goto out;
    const struct policy *p = find_policy(policy, policy_len, 0);
    if (p && allowlisted(name, (size_t)name_len, &p->deny))
        result = DENIED;
    else
        result = p && allowlisted(name, (size_t)name_len, &p->allow) ? PASS : NOT_ALLOWLISTED;
out:
    free(records);
    free(fragments);
    return result;
}

/* --- Squid's side: lines in, answers out ---------------------------------------------------------------------- */
static char *answers;
static size_t answers_len, answers_cap;

static void append(const char *s, size_t n) {
    if (answers_len + n > answers_cap) answers = xrealloc(answers, answers_cap = (answers_len + n) * 2);
    memcpy(answers + answers_len, s, n);
    answers_len += n;
}

static void answer(const char *line, size_t n) {
    const char *field[3] = {"", "", ""};
    size_t len[3] = {0, 0, 0}, i = 0;
    for (int f = 0; f < 3; f++) {
        while (i < n && is_space((unsigned char)line[i])) i++;
        if (i == n) break;
        field[f] = line + i;
        while (i < n && !is_space((unsigned char)line[i])) i++;
        len[f] = (size_t)(line + i - field[f]);
    }
    const char *text = VERDICT_TEXT[verdict(field[1], len[1], field[2], len[2])];
    append(field[0], len[0]);
    append(" ", 1);
    append(text, strlen(text));
    append("\n", 1);
}

static void flush_answers(void) {
    size_t done = 0;
    while (done < answers_len) {
        ssize_t w = write(STDOUT_FILENO, answers + done, answers_len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) exit(1); /* Squid went away */
        done += (size_t)w;
    }
    answers_len = 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fputs("usage: sni_helper POLICY_DIR\n", stderr);
        return 2;
    }
    load_policies(argv[1]);
    size_t cap = 1 << 16, have = 0;
    char *buf = xrealloc(NULL, cap);
    for (;;) {
        if (have == cap) buf = xrealloc(buf, cap *= 2);
        ssize_t got = read(STDIN_FILENO, buf + have, cap - have);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (have) answer(buf, have); /* a last line without its newline */
            flush_answers();
            return got < 0;
        }
        have += (size_t)got;
        size_t start = 0;
        for (char *nl; (nl = memchr(buf + start, '\n', have - start)); start = (size_t)(nl - buf) + 1)
            answer(buf + start, (size_t)(nl - buf) - start);
        memmove(buf, buf + start, have - start);
        have -= start;
        flush_answers();
    }
}
