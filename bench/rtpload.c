/*
 * rtpload: a SIP/RTP echo-call load generator for bench/rtp_load.py.
 *
 * One thread, one loop: clock_nanosleep (CLOCK_MONOTONIC, absolute, on a
 * --tick-us grid) to the next thing due, then one non-blocking epoll_wait
 * harvests every socket that became readable; the kernel's receive timestamps
 * (SO_TIMESTAMPNS) make the batching invisible in the figures and keep the
 * wake-ups per second independent of N. For N calls it acts as a SIP UAC
 * towards 127.0.0.1:--sip-port: INVITE (PCMU/8000 + telephone-event, each
 * call its own RTP socket at --rtp-base + 2*i), 100/1xx/200, ACK; after the
 * test window BYE and wait for its 200. INVITEs start at --rate calls/s.
 *
 * --transport udp (default) sends SIP from one UDP socket. --transport tls
 * carries every call's SIP on ONE TLS connection (RFC 3261 §18, as a PBX or
 * SBC trunk would; --transport tcp the same on one plain TCP connection):
 * Via SIP/2.0/TLS (TCP), Contact ;transport=tls (tcp), no
 * retransmissions (reliable transport, §17.1.1.2), received bytes framed by
 * Content-Length (§18.3), written and read non-blocking from the epoll loop
 * (its messages are stamped when read: a stream has no kernel timestamps).
 * The daemon's certificate is verified against --tls-ca FILE (and its IP
 * 127.0.0.1), or not at all without it. --srtp offers RTP/SAVP with
 * a=crypto:1 AES_CM_128_HMAC_SHA1_80 and a fresh key per call (RFC 4568
 * §6.2.1); the answer's a=crypto gives the daemon's key, every packet sent is
 * protected and every one received unprotected with libsrtp2 (RFC 3711)
 * before the figures below see it; libsrtp2's AES and HMAC-SHA1 run on OpenSSL
 * (see "libsrtp2's AES-ICM-128 and HMAC-SHA1 on OpenSSL" below).
 *
 * Every call sends a 160-byte µ-law frame every 20 ms; the calls' phases are
 * spread evenly over the 20 ms period, or all equal with --aligned. The frames
 * are the clip (--clip, raw µ-law bytes, L = 160·m + 1 samples) looped as one
 * byte stream, so the L frames of one loop are all different and an echoed
 * payload names the frame it echoes (after folding µ-law's two zeros, 0x7F
 * and 0xFF, into one).
 *
 * The steady window starts --settle s after the last INVITE and lasts
 * --duration s. Over it: per call the daemon's outbound inter-packet gaps,
 * loss from sequence numbers, echo latency (receive time of an echoed frame
 * minus the time this process sent it); this process's send lateness (send
 * time minus schedule) and CPU (getrusage). Stdout: one JSON object per line,
 * {"event":"window_start"|"window_mid"|"window_end", ...} while it runs, then
 * {"event":"result", ...} with every figure (times in ms).
 *
 * gcc -O2 -std=c11 -o rtpload rtpload.c $(pkg-config --cflags --libs libsrtp2 openssl)
 */
#define _GNU_SOURCE
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA1_*: see "libsrtp2's AES-ICM-128 ..." */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/sha.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <srtp2/auth.h>
#include <srtp2/cipher.h>
#include <srtp2/srtp.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FRAME_BYTES 160
#define RTP_HEADER_BYTES 12
#define PERIOD_NS 20000000LL
#define NS_PER_S 1000000000LL
#define RING_FRAMES 512 /* send times kept per call: 10.24 s of frames */
#define SIP_T1_NS 500000000LL
#define INVITE_TIMEOUT_NS (32 * NS_PER_S)
#define BYE_TIMEOUT_NS (5 * NS_PER_S)
#define BYE_SPACING_NS 1000000LL /* BYEs at most 1,000/s */
#define TAIL_NS 500000000LL      /* RTP keeps flowing this long after the window */
#define MEDIA_STOPPED_NS NS_PER_S
#define SCAN_NS 20000000LL /* retransmission/timeout scan period */
#define IDLE_NS 1000000LL  /* sockets are harvested at least this often */
#define AMBIGUOUS 0x80000000u /* the clip holds this frame more than once */
#define ID_SIP (UINT32_MAX - 1)
#define PT_PCMU 0
#define MAX_EVENTS 512
#define SEND_CHECK_EVENTS 16 /* events handled between checks for due frames (power of 2) */
#define SIP_MAX_BYTES 8192
#define TLS_READ_BYTES 16384
#define KEY_SALT_BYTES 30 /* SRTP master key + salt (RFC 4568 §6.2.1) */
#define KEY_B64_CHARS 40

enum state { ST_IDLE, ST_INVITING, ST_PROCEEDING, ST_UP, ST_REJECTED, ST_BYEING, ST_DONE };

struct sent_frame {
    uint32_t frame;
    int64_t real_ns;
};

struct call {
    int fd;
    int port;
    enum state state;
    int64_t invite_ns, last_tx_ns, retx_ns, answered_ns, bye_ns;
    char to_hdr[256];
    char req_uri[256];
    char fail[48];
    int connected;
    /* sending */
    int sending;
    uint32_t frame0, nsent;
    uint16_t seq0;
    uint32_t ssrc;
    struct sent_frame ring[RING_FRAMES];
    /* receiving, in the window */
    int64_t last_rx_win_ns;
    int have_seq;
    uint16_t last_seq;
    int64_t ext_seq, min_ext, max_ext;
    uint64_t rx_win, rx_total;
    uint64_t unmatched, ambiguous, stale;
    int daemon_bye;
    /* --srtp: our key (base64, as offered) and the two sessions */
    char key_b64[KEY_B64_CHARS + 1];
    srtp_t srtp_tx, srtp_rx;
};

/* a growable byte buffer */
struct bytes {
    char *p;
    size_t n, cap;
};

static void reserve(struct bytes *b, size_t cap) {
    if (cap <= b->cap)
        return;
    b->cap = cap > 2 * b->cap ? cap : 2 * b->cap;
    b->p = realloc(b->p, b->cap);
    if (!b->p) {
        perror("realloc");
        exit(1);
    }
}

/* growable float array (values in µs) */
struct series {
    float *v;
    size_t n, cap;
};

static void push(struct series *s, double us) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4096;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) {
            perror("realloc");
            exit(1);
        }
    }
    s->v[s->n++] = (float)us;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile (q in 0..100) of a sorted series, in ms; NaN when empty */
static double pct_ms(const struct series *s, int q) {
    if (!s->n)
        return NAN;
    size_t rank = (s->n * (size_t)q + 99) / 100; /* ceil(n·q/100) */
    if (rank < 1)
        rank = 1;
    if (rank > s->n)
        rank = s->n;
    return s->v[rank - 1] / 1000.0;
}

/* --- options --- */
static int opt_calls = 10, opt_sip_port, opt_rtp_base, opt_aligned, opt_tick_us = 250;
static double opt_rate = 100.0, opt_duration = 20.0, opt_settle = 2.0;
static const char *opt_clip, *opt_tls_ca;
static int opt_stream, opt_tls, opt_srtp; /* opt_stream: tcp or tls */

/* --- state --- */
static struct call *calls;
static int sip_fd, ep_fd, sip_local_port;
static struct sockaddr_in daemon_sip;
static int64_t t0, mono_to_real;
static int64_t window_start, window_end, send_stop, finish_by; /* monotonic */
static int64_t ws_real, we_real, first5_real, last5_real;
static uint8_t *stream;  /* clip + its first frame: frame at offset o is stream[o..o+160) */
static uint8_t *canon;   /* the same with 0x7F folded into 0xFF */
static uint32_t clip_len; /* L samples = distinct frames */
static uint32_t *table;  /* open addressing: frame index + 1 (| AMBIGUOUS), 0 empty */
static uint32_t table_mask;
static struct series gaps, echo, echo_first5, echo_last5, late, answer;
static uint64_t tx_packets, tx_errors, rx_foreign, sip_rx, sip_unparsed, srtp_errors;
/* --transport tls: the connection, bytes not yet framed / not yet written */
static SSL *tls;
static struct bytes tls_in, tls_out;
static int tls_want_write;
static uint32_t sip_epoll_events = EPOLLIN;
static char sip_connection_error[96]; /* why the TLS connection ended, "" while it is up */
static int status_counts[700];
static char first_warning[160]; /* the Warning header of the first INVITE refused */
static char run_id[32];

static int64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static int64_t mono(void) { return clock_ns(CLOCK_MONOTONIC); }

static int64_t cpu_ns(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * NS_PER_S +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
}

static void fail(struct call *c, const char *fmt, ...) {
    if (c->fail[0])
        return; /* the first reason is the one reported */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->fail, sizeof c->fail, fmt, ap);
    va_end(ap);
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* --- the clip's frames and their index --- */

static uint64_t frame_hash(const uint8_t *p) {
    uint64_t h = 1469598103934665603ULL;
    for (int j = 0; j < FRAME_BYTES; j++) {
        uint8_t b = p[j] == 0x7F ? 0xFF : p[j];
        h = (h ^ b) * 1099511628211ULL;
    }
    return h;
}

static int canon_equal(const uint8_t *payload, const uint8_t *ref) {
    for (int j = 0; j < FRAME_BYTES; j++)
        if ((payload[j] == 0x7F ? 0xFF : payload[j]) != ref[j])
            return 0;
    return 1;
}

static uint32_t frame_offset(uint64_t frame) { return (uint32_t)((frame * FRAME_BYTES) % clip_len); }

static void load_clip(void) {
    FILE *f = fopen(opt_clip, "rb");
    if (!f)
        die(opt_clip);
    struct stat st;
    if (fstat(fileno(f), &st) < 0)
        die("fstat");
    clip_len = (uint32_t)st.st_size;
    if (clip_len < 2 * FRAME_BYTES) {
        fprintf(stderr, "clip too short: %u bytes\n", clip_len);
        exit(2);
    }
    stream = malloc(clip_len + FRAME_BYTES);
    canon = malloc(clip_len + FRAME_BYTES);
    if (!stream || !canon || fread(stream, 1, clip_len, f) != clip_len)
        die("clip");
    fclose(f);
    memcpy(stream + clip_len, stream, FRAME_BYTES);
    for (uint32_t j = 0; j < clip_len + FRAME_BYTES; j++)
        canon[j] = stream[j] == 0x7F ? 0xFF : stream[j];
    uint32_t size = 1;
    while (size < 2 * clip_len)
        size <<= 1;
    table_mask = size - 1;
    table = calloc(size, sizeof *table);
    if (!table)
        die("calloc");
    for (uint32_t k = 0; k < clip_len; k++) {
        const uint8_t *p = canon + frame_offset(k);
        for (uint32_t slot = (uint32_t)frame_hash(p) & table_mask;; slot = (slot + 1) & table_mask) {
            uint32_t e = table[slot];
            if (e == 0) {
                table[slot] = k + 1;
                break;
            }
            if (memcmp(canon + frame_offset((e & ~AMBIGUOUS) - 1), p, FRAME_BYTES) == 0) {
                table[slot] = e | AMBIGUOUS;
                break;
            }
        }
    }
}

/* frame index (mod L) of a payload: -1 unknown, -2 in the clip more than once */
static int64_t lookup_frame(const uint8_t *payload) {
    for (uint32_t slot = (uint32_t)frame_hash(payload) & table_mask;; slot = (slot + 1) & table_mask) {
        uint32_t e = table[slot];
        if (e == 0)
            return -1;
        if (canon_equal(payload, canon + frame_offset((e & ~AMBIGUOUS) - 1)))
            return e & AMBIGUOUS ? -2 : (int64_t)(e - 1);
    }
}

/* --- the SIP connection (--transport tcp|tls; `tls` is NULL over TCP) --- */

static void tls_close(const char *why) {
    if (sip_connection_error[0])
        return;
    snprintf(sip_connection_error, sizeof sip_connection_error, "%s", why);
    fprintf(stderr, "rtpload: SIP %s connection: %s\n", opt_tls ? "TLS" : "TCP", why);
    ERR_print_errors_fp(stderr);
    epoll_ctl(ep_fd, EPOLL_CTL_DEL, sip_fd, NULL);
}

/* after an SSL_read/SSL_write (recv/send over TCP) that returned ret <= 0: 1 while the
   connection is usable (the call is retried when the socket is readable, or writable:
   tls_want_write) */
static int tls_blocked(int ret, int writing) {
    if (!tls) {
        if (ret < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            tls_want_write |= writing;
            return 1;
        }
        tls_close(ret == 0 ? "closed by the daemon" : "closed or reset");
        return 0;
    }
    int err = SSL_get_error(tls, ret);
    if (err == SSL_ERROR_WANT_READ)
        return 1;
    if (err == SSL_ERROR_WANT_WRITE) {
        tls_want_write = 1;
        return 1;
    }
    tls_close(err == SSL_ERROR_ZERO_RETURN ? "closed by the daemon"
              : err == SSL_ERROR_SYSCALL   ? "closed or reset"
                                           : "TLS error");
    return 0;
}

/* write what is queued, as far as the socket takes it; EPOLLOUT while some is left */
static void tls_flush(void) {
    while (tls_out.n && !sip_connection_error[0]) {
        int w = tls ? SSL_write(tls, tls_out.p,
                                tls_out.n > INT32_MAX ? INT32_MAX : (int)tls_out.n)
                    : (int)send(sip_fd, tls_out.p, tls_out.n > INT32_MAX ? INT32_MAX : tls_out.n,
                                MSG_NOSIGNAL);
        if (w <= 0) {
            tls_blocked(w, 1);
            break;
        }
        memmove(tls_out.p, tls_out.p + w, tls_out.n - (size_t)w);
        tls_out.n -= (size_t)w;
    }
    uint32_t want = EPOLLIN | (tls_want_write ? EPOLLOUT : 0);
    if (want != sip_epoll_events && !sip_connection_error[0]) {
        struct epoll_event ev = {.events = want, .data.u32 = ID_SIP};
        if (epoll_ctl(ep_fd, EPOLL_CTL_MOD, sip_fd, &ev) < 0)
            die("epoll_ctl");
        sip_epoll_events = want;
    }
}

static void sip_send(const char *msg, int len) {
    if (opt_stream) {
        if (sip_connection_error[0])
            return;
        reserve(&tls_out, tls_out.n + (size_t)len);
        memcpy(tls_out.p + tls_out.n, msg, (size_t)len);
        tls_out.n += (size_t)len;
        tls_flush();
    } else if (sendto(sip_fd, msg, (size_t)len, 0, (struct sockaddr *)&daemon_sip,
                      sizeof daemon_sip) < 0) {
        perror("sendto sip");
    }
}

static const char *via_transport(void) { return opt_tls ? "TLS" : opt_stream ? "TCP" : "UDP"; }

/* INVITE and BYE retransmit from T1 over UDP, never over TLS (RFC 3261 §17.1.1.2):
   the first retransmission falls due after the transaction's timeout */
static int64_t first_retransmit_ns(void) { return opt_stream ? INVITE_TIMEOUT_NS : SIP_T1_NS; }

static int call_sdp(int i, char *out, size_t cap) {
    char crypto[96] = "";
    if (opt_srtp)
        snprintf(crypto, sizeof crypto, "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:%s\r\n",
                 calls[i].key_b64);
    return snprintf(out, cap,
                    "v=0\r\no=rtpload %d 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
                    "t=0 0\r\nm=audio %d %s 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
                    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\n"
                    "a=sendrecv\r\n%s",
                    i, calls[i].port, opt_srtp ? "RTP/SAVP" : "RTP/AVP", crypto);
}

static void send_invite(int i) {
    char sdp[640], msg[2048];
    int sdp_len = call_sdp(i, sdp, sizeof sdp);
    int len = snprintf(msg, sizeof msg,
                       "INVITE sip:echo@127.0.0.1:%d SIP/2.0\r\n"
                       "Via: SIP/2.0/%s 127.0.0.1:%d;branch=z9hG4bK-%s-%d-inv;rport\r\n"
                       "Max-Forwards: 70\r\n"
                       "From: \"rtpload\" <sip:rtpload@127.0.0.1:%d>;tag=%s-%d\r\n"
                       "To: <sip:echo@127.0.0.1:%d>\r\n"
                       "Call-ID: %s-%d\r\n"
                       "CSeq: 1 INVITE\r\n"
                       "Contact: <sip:rtpload@127.0.0.1:%d%s>\r\n"
                       "Subject: voxgate echo\r\n"
                       "Content-Type: application/sdp\r\n"
                       "Content-Length: %d\r\n\r\n%s",
                       opt_sip_port, via_transport(), sip_local_port, run_id, i, sip_local_port,
                       run_id, i, opt_sip_port, run_id, i, sip_local_port,
                       opt_tls ? ";transport=tls" : opt_stream ? ";transport=tcp" : "", sdp_len, sdp);
    sip_send(msg, len);
}

/* ACK: for a 2xx a new transaction to the Contact; for a failure, the INVITE's branch */
static void send_ack(int i, int for_2xx) {
    struct call *c = &calls[i];
    char msg[1024], uri[256];
    if (for_2xx)
        snprintf(uri, sizeof uri, "%s", c->req_uri);
    else
        snprintf(uri, sizeof uri, "sip:echo@127.0.0.1:%d", opt_sip_port);
    int len = snprintf(msg, sizeof msg,
                       "ACK %s SIP/2.0\r\n"
                       "Via: SIP/2.0/%s 127.0.0.1:%d;branch=z9hG4bK-%s-%d-%s;rport\r\n"
                       "Max-Forwards: 70\r\n"
                       "From: \"rtpload\" <sip:rtpload@127.0.0.1:%d>;tag=%s-%d\r\n"
                       "To: %s\r\n"
                       "Call-ID: %s-%d\r\n"
                       "CSeq: 1 ACK\r\n"
                       "Content-Length: 0\r\n\r\n",
                       uri, via_transport(), sip_local_port, run_id, i, for_2xx ? "ack" : "inv",
                       sip_local_port, run_id, i, c->to_hdr, run_id, i);
    sip_send(msg, len);
}

static void send_bye(int i) {
    struct call *c = &calls[i];
    char msg[1024];
    int len = snprintf(msg, sizeof msg,
                       "BYE %s SIP/2.0\r\n"
                       "Via: SIP/2.0/%s 127.0.0.1:%d;branch=z9hG4bK-%s-%d-bye;rport\r\n"
                       "Max-Forwards: 70\r\n"
                       "From: \"rtpload\" <sip:rtpload@127.0.0.1:%d>;tag=%s-%d\r\n"
                       "To: %s\r\n"
                       "Call-ID: %s-%d\r\n"
                       "CSeq: 2 BYE\r\n"
                       "Content-Length: 0\r\n\r\n",
                       c->req_uri, via_transport(), sip_local_port, run_id, i, sip_local_port,
                       run_id, i, c->to_hdr, run_id, i);
    sip_send(msg, len);
}

/* value of header `name` (or its compact form), trimmed, copied into out; 0 if absent */
static int header(const char *msg, const char *name, char compact, char *out, size_t cap) {
    const char *line = strstr(msg, "\r\n");
    size_t name_len = strlen(name);
    while (line && line[2] != '\r' && line[2] != '\0') {
        line += 2;
        const char *end = strstr(line, "\r\n");
        if (!end)
            end = line + strlen(line);
        const char *colon = memchr(line, ':', (size_t)(end - line));
        if (colon) {
            const char *n_end = colon;
            while (n_end > line && (n_end[-1] == ' ' || n_end[-1] == '\t'))
                n_end--;
            size_t n_len = (size_t)(n_end - line);
            if ((n_len == name_len && strncasecmp(line, name, name_len) == 0) ||
                (compact && n_len == 1 && (line[0] | 0x20) == compact)) {
                const char *v = colon + 1;
                while (v < end && (*v == ' ' || *v == '\t'))
                    v++;
                size_t v_len = (size_t)(end - v);
                if (v_len >= cap)
                    v_len = cap - 1;
                memcpy(out, v, v_len);
                out[v_len] = '\0';
                return 1;
            }
        }
        line = *end ? end : NULL;
    }
    return 0;
}

/* call index from a Call-ID of ours ("<run_id>-<i>"), -1 otherwise */
static int call_index(const char *msg) {
    char id[128];
    size_t rl = strlen(run_id);
    if (!header(msg, "Call-ID", 'i', id, sizeof id) || strncmp(id, run_id, rl) != 0 || id[rl] != '-')
        return -1;
    char *end;
    long i = strtol(id + rl + 1, &end, 10);
    if (*end != '\0' || i < 0 || i >= opt_calls)
        return -1;
    return (int)i;
}

/* the audio address of an SDP body: 0 on success */
static int parse_sdp(const char *body, struct sockaddr_in *out) {
    const char *c = strstr(body, "c=IN IP4 ");
    const char *m = strstr(body, "m=audio ");
    if (!c || !m)
        return -1;
    char ip[64];
    size_t n = strcspn(c + 9, "\r\n /");
    if (n >= sizeof ip)
        return -1;
    memcpy(ip, c + 9, n);
    ip[n] = '\0';
    long port = strtol(m + 8, NULL, 10);
    if (port <= 0 || port > 65535)
        return -1;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, ip, &out->sin_addr) == 1 ? 0 : -1;
}

/* --- libsrtp2's AES-ICM-128 and HMAC-SHA1 on OpenSSL ---
 * Debian's libsrtp2 is built on NSS, which sets up a crypto context per packet
 * (~10 µs per protect + unprotect here); these replace its two primitives for
 * AES_CM_128_HMAC_SHA1_80 (srtp_replace_cipher_type/_auth_type, each checked by
 * libsrtp's self-test against the vectors below) while libsrtp2 keeps doing SRTP
 * itself (key derivation, index/ROC, replay, RFC 3711 §3-4). Nothing is set up per
 * packet: the keystream is AES-128-ECB over a batch of counter blocks, the HMAC
 * copies SHA-1 states keyed once (OpenSSL's low-level SHA1_*, deprecated but the
 * one way to copy a digest state without an allocation). */

#define ICM_BATCH_BLOCKS 12 /* keystream made per AES call: a whole 160-byte payload */

struct icm_state {
    EVP_CIPHER_CTX *ecb;
    uint8_t salt[16];    /* the 14-byte salt, then 2 zero bytes (RFC 3711 §4.1.1) */
    uint8_t counter[16]; /* the next keystream block's counter */
    uint8_t keystream[ICM_BATCH_BLOCKS * 16];
    unsigned used; /* keystream bytes used; all: make more */
};

static const srtp_cipher_type_t icm_ossl;

static srtp_err_status_t icm_alloc(srtp_cipher_pointer_t *cp, int key_len, int tag_len) {
    (void)tag_len;
    if (key_len != SRTP_AES_ICM_128_KEY_LEN_WSALT)
        return srtp_err_status_bad_param;
    srtp_cipher_t *c = calloc(1, sizeof *c);
    struct icm_state *s = calloc(1, sizeof *s);
    if (!c || !s || !(s->ecb = EVP_CIPHER_CTX_new()))
        return srtp_err_status_alloc_fail;
    c->type = &icm_ossl;
    c->state = s;
    c->key_len = key_len;
    c->algorithm = SRTP_AES_ICM_128;
    *cp = c;
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_dealloc(srtp_cipher_pointer_t c) {
    struct icm_state *s = c->state;
    EVP_CIPHER_CTX_free(s->ecb);
    free(s);
    free(c);
    return srtp_err_status_ok;
}

/* key: the 16-byte key then the 14-byte salt */
static srtp_err_status_t icm_init(void *state, const uint8_t *key) {
    struct icm_state *s = state;
    memset(s->salt, 0, sizeof s->salt);
    memcpy(s->salt, key + SRTP_AES_128_KEY_LEN, SRTP_SALT_LEN);
    if (EVP_EncryptInit_ex(s->ecb, EVP_aes_128_ecb(), NULL, key, NULL) != 1 ||
        EVP_CIPHER_CTX_set_padding(s->ecb, 0) != 1)
        return srtp_err_status_init_fail;
    s->used = sizeof s->keystream;
    return srtp_err_status_ok;
}

/* counter = salt XOR iv (iv: the SSRC and packet index, placed by libsrtp) */
static srtp_err_status_t icm_set_iv(void *state, uint8_t *iv, srtp_cipher_direction_t dir) {
    (void)dir;
    struct icm_state *s = state;
    for (int j = 0; j < 16; j++)
        s->counter[j] = s->salt[j] ^ iv[j];
    s->used = sizeof s->keystream;
    return srtp_err_status_ok;
}

/* CTR mode, the block counter in the last 16 bits (as libsrtp): encrypting and
   decrypting are the same, in place */
static srtp_err_status_t icm_crypt(void *state, uint8_t *buf, unsigned int *len) {
    struct icm_state *s = state;
    for (unsigned j = 0; j < *len;) {
        if (s->used == sizeof s->keystream) {
            uint8_t counters[sizeof s->keystream];
            for (int b = 0; b < ICM_BATCH_BLOCKS; b++) {
                memcpy(counters + 16 * b, s->counter, 16);
                if (++s->counter[15] == 0)
                    s->counter[14]++;
            }
            int out = 0;
            if (EVP_EncryptUpdate(s->ecb, s->keystream, &out, counters, sizeof counters) != 1)
                return srtp_err_status_cipher_fail;
            s->used = 0;
        }
        unsigned n = *len - j;
        if (n > sizeof s->keystream - s->used)
            n = sizeof s->keystream - s->used;
        const uint8_t *ks = s->keystream + s->used;
        for (unsigned k = 0; k < n; k++) /* one loop the compiler vectorises */
            buf[j + k] ^= ks[k];
        j += n;
        s->used += n;
    }
    return srtp_err_status_ok;
}

/* RFC 3711 Appendix B.2: the first 32 bytes of keystream for a zero index */
static const uint8_t icm_test_key[SRTP_AES_ICM_128_KEY_LEN_WSALT] = {
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f,
    0x3c, 0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd};
static uint8_t icm_test_nonce[16];
static const uint8_t icm_test_plain[32];
static const uint8_t icm_test_cipher[32] = {
    0xe0, 0x3e, 0xad, 0x09, 0x35, 0xc9, 0x5e, 0x80, 0xe1, 0x66, 0xb1, 0x6d, 0xd9, 0x2b, 0x4e, 0xb4,
    0xd2, 0x35, 0x13, 0x16, 0x2b, 0x02, 0xd0, 0xf7, 0x2a, 0x43, 0xa2, 0xfe, 0x4a, 0x5f, 0x97, 0xab};
static const srtp_cipher_test_case_t icm_test = {
    SRTP_AES_ICM_128_KEY_LEN_WSALT, icm_test_key, icm_test_nonce, 32, icm_test_plain, 32,
    icm_test_cipher, 0, NULL, 0, NULL};

static const srtp_cipher_type_t icm_ossl = {
    icm_alloc, icm_dealloc, icm_init,  NULL, icm_crypt, icm_crypt, icm_set_iv,
    NULL,      "AES-128 counter mode (OpenSSL)", &icm_test, SRTP_AES_ICM_128};

struct hmac_state {
    SHA_CTX inner, outer; /* after the key XOR ipad / opad (RFC 2104 §2) */
    SHA_CTX work;         /* the tag being made */
};

static const srtp_auth_type_t hmac_ossl;

static srtp_err_status_t hmac_alloc(srtp_auth_pointer_t *ap, int key_len, int out_len) {
    if (key_len < 0 || key_len > SHA_DIGEST_LENGTH || out_len < 0 || out_len > SHA_DIGEST_LENGTH)
        return srtp_err_status_bad_param;
    srtp_auth_t *a = calloc(1, sizeof *a);
    struct hmac_state *s = calloc(1, sizeof *s);
    if (!a || !s)
        return srtp_err_status_alloc_fail;
    a->type = &hmac_ossl;
    a->state = s;
    a->out_len = out_len;
    a->key_len = key_len;
    *ap = a;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_dealloc(srtp_auth_pointer_t a) {
    free(a->state);
    free(a);
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_init(void *state, const uint8_t *key, int key_len) {
    struct hmac_state *s = state;
    uint8_t ipad[SHA_CBLOCK], opad[SHA_CBLOCK];
    memset(ipad, 0x36, sizeof ipad);
    memset(opad, 0x5c, sizeof opad);
    for (int j = 0; j < key_len; j++) {
        ipad[j] ^= key[j];
        opad[j] ^= key[j];
    }
    SHA1_Init(&s->inner);
    SHA1_Update(&s->inner, ipad, sizeof ipad);
    SHA1_Init(&s->outer);
    SHA1_Update(&s->outer, opad, sizeof opad);
    s->work = s->inner;
    return srtp_err_status_ok;
}

/* a new tag with the same key */
static srtp_err_status_t hmac_start(void *state) {
    struct hmac_state *s = state;
    s->work = s->inner;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_update(void *state, const uint8_t *buf, int len) {
    struct hmac_state *s = state;
    SHA1_Update(&s->work, buf, (size_t)len);
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_compute(void *state, const uint8_t *buf, int len, int tag_len,
                                      uint8_t *tag) {
    struct hmac_state *s = state;
    uint8_t digest[SHA_DIGEST_LENGTH];
    if (tag_len > SHA_DIGEST_LENGTH)
        return srtp_err_status_bad_param;
    SHA1_Update(&s->work, buf, (size_t)len);
    SHA1_Final(digest, &s->work);
    SHA_CTX outer = s->outer;
    SHA1_Update(&outer, digest, sizeof digest);
    SHA1_Final(digest, &outer);
    memcpy(tag, digest, (size_t)tag_len);
    return srtp_err_status_ok;
}

/* RFC 2202 §3 test case 1 */
static const uint8_t hmac_test_key[20] = {0x0b, 0x0b, 0x0b, 0x0b, 0x0b, 0x0b, 0x0b,
                                          0x0b, 0x0b, 0x0b, 0x0b, 0x0b, 0x0b, 0x0b,
                                          0x0b, 0x0b, 0x0b, 0x0b, 0x0b, 0x0b};
static const uint8_t hmac_test_data[8] = {'H', 'i', ' ', 'T', 'h', 'e', 'r', 'e'};
static const uint8_t hmac_test_tag[20] = {0xb6, 0x17, 0x31, 0x86, 0x55, 0x05, 0x72,
                                          0x64, 0xe2, 0x8b, 0xc0, 0xb6, 0xfb, 0x37,
                                          0x8c, 0x8e, 0xf1, 0x46, 0xbe, 0x00};
static const srtp_auth_test_case_t hmac_test = {20, hmac_test_key, 8, hmac_test_data, 20,
                                                hmac_test_tag, NULL};

static const srtp_auth_type_t hmac_ossl = {
    hmac_alloc, hmac_dealloc, hmac_init, hmac_compute, hmac_update, hmac_start,
    "HMAC-SHA1 (OpenSSL)", &hmac_test, SRTP_HMAC_SHA1};

/* libsrtp2 ready, its AES-ICM-128 and HMAC-SHA1 on OpenSSL */
static void srtp_setup(void) {
    if (srtp_init() != srtp_err_status_ok ||
        srtp_replace_cipher_type(&icm_ossl, SRTP_AES_ICM_128) != srtp_err_status_ok ||
        srtp_replace_auth_type(&hmac_ossl, SRTP_HMAC_SHA1) != srtp_err_status_ok) {
        fprintf(stderr, "rtpload: libsrtp2 setup (OpenSSL AES-ICM/HMAC-SHA1) failed\n");
        ERR_print_errors_fp(stderr);
        exit(1);
    }
}

/* an SRTP session (AES_CM_128_HMAC_SHA1_80, RFC 3711 §5) for what we send or receive */
static srtp_t srtp_session(const uint8_t key_salt[KEY_SALT_BYTES], srtp_ssrc_type_t direction) {
    srtp_policy_t policy;
    memset(&policy, 0, sizeof policy);
    srtp_crypto_policy_set_rtp_default(&policy.rtp);
    srtp_crypto_policy_set_rtcp_default(&policy.rtcp);
    policy.ssrc.type = direction;
    policy.key = (unsigned char *)key_salt;
    srtp_t session;
    if (srtp_create(&session, &policy) != srtp_err_status_ok) {
        fprintf(stderr, "srtp_create failed\n");
        exit(1);
    }
    return session;
}

/* the answer's a=crypto (RFC 4568 §9.1): our tag 1 and suite, the daemon's key and
   salt into key_salt; 0 on success */
static int parse_crypto(const char *body, uint8_t key_salt[KEY_SALT_BYTES]) {
    static const char prefix[] = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:";
    const char *a = strstr(body, prefix);
    if (!a)
        return -1;
    const char *b64 = a + sizeof prefix - 1;
    if (strcspn(b64, "|\r\n \t") != KEY_B64_CHARS)
        return -1;
    uint8_t out[KEY_SALT_BYTES + 3]; /* EVP_DecodeBlock writes whole 3-byte groups */
    if (EVP_DecodeBlock(out, (const unsigned char *)b64, KEY_B64_CHARS) != KEY_SALT_BYTES)
        return -1;
    memcpy(key_salt, out, KEY_SALT_BYTES);
    return 0;
}

static void on_answer(int i, const char *msg, int64_t now) {
    struct call *c = &calls[i];
    char contact[256];
    header(msg, "To", 't', c->to_hdr, sizeof c->to_hdr);
    if (header(msg, "Contact", 'm', contact, sizeof contact)) {
        char *lt = strchr(contact, '<'), *gt = lt ? strchr(lt, '>') : NULL;
        if (lt && gt) {
            *gt = '\0';
            snprintf(c->req_uri, sizeof c->req_uri, "%s", lt + 1);
        } else {
            contact[strcspn(contact, ";")] = '\0';
            snprintf(c->req_uri, sizeof c->req_uri, "%s", contact);
        }
    } else {
        snprintf(c->req_uri, sizeof c->req_uri, "sip:echo@127.0.0.1:%d", opt_sip_port);
    }
    send_ack(i, 1);
    c->answered_ns = now;
    push(&answer, (double)(now - c->invite_ns) / 1000.0);
    const char *body = strstr(msg, "\r\n\r\n");
    struct sockaddr_in rtp;
    if (!body || parse_sdp(body + 4, &rtp) != 0) {
        fail(c, "answer without audio address");
        c->state = ST_UP; /* hung up with the others */
        return;
    }
    if (opt_srtp) {
        uint8_t key_salt[KEY_SALT_BYTES];
        if (!strstr(body, " RTP/SAVP ") || parse_crypto(body + 4, key_salt) != 0) {
            fail(c, "answer without RTP/SAVP and our a=crypto");
            c->state = ST_UP;
            return;
        }
        c->srtp_rx = srtp_session(key_salt, ssrc_any_inbound);
    }
    if (connect(c->fd, (struct sockaddr *)&rtp, sizeof rtp) < 0) {
        fail(c, "connect: %s", strerror(errno));
        c->state = ST_UP;
        return;
    }
    c->connected = 1;
    c->state = ST_UP;
    c->sending = now < send_stop;
    if (now > window_start)
        fail(c, "answered after the window started");
}

static void respond(const char *msg, int status, const char *reason) {
    char via[512], from[256], to[256], callid[128], cseq[64], out[2048];
    int n = snprintf(out, sizeof out, "SIP/2.0 %d %s\r\n", status, reason);
    /* every Via, in order */
    const char *line = strstr(msg, "\r\n");
    while (line && line[2] != '\r' && line[2] != '\0') {
        line += 2;
        const char *end = strstr(line, "\r\n");
        if (!end)
            break;
        if ((strncasecmp(line, "Via:", 4) == 0 || strncasecmp(line, "v:", 2) == 0) &&
            (size_t)(end - line) < sizeof via) {
            n += snprintf(out + n, sizeof out - (size_t)n, "%.*s\r\n", (int)(end - line), line);
        }
        line = end;
    }
    if (!header(msg, "From", 'f', from, sizeof from) || !header(msg, "To", 't', to, sizeof to) ||
        !header(msg, "Call-ID", 'i', callid, sizeof callid) ||
        !header(msg, "CSeq", 0, cseq, sizeof cseq))
        return;
    n += snprintf(out + n, sizeof out - (size_t)n,
                  "From: %s\r\nTo: %s\r\nCall-ID: %s\r\nCSeq: %s\r\nContent-Length: 0\r\n\r\n", from,
                  to, callid, cseq);
    if (n > 0 && (size_t)n < sizeof out)
        sip_send(out, n);
}

static void on_sip(char *msg, int64_t now) {
    sip_rx++;
    int i = call_index(msg);
    if (strncmp(msg, "SIP/2.0 ", 8) != 0) { /* a request from the daemon */
        if (strncmp(msg, "BYE ", 4) == 0) {
            respond(msg, 200, "OK");
            if (i >= 0) {
                struct call *c = &calls[i];
                if (now < send_stop)
                    fail(c, "ended by the daemon (BYE)");
                c->daemon_bye = 1;
                c->sending = 0;
                c->state = ST_DONE;
            }
        } else if (strncmp(msg, "ACK ", 4) != 0) {
            respond(msg, 501, "Not Implemented");
        }
        return;
    }
    int status = atoi(msg + 8);
    char cseq[64];
    if (i < 0 || status < 100 || status > 699 || !header(msg, "CSeq", 0, cseq, sizeof cseq)) {
        sip_unparsed++;
        return;
    }
    struct call *c = &calls[i];
    if (strstr(cseq, "INVITE")) {
        status_counts[status]++;
        if (status < 200) {
            if (c->state == ST_INVITING)
                c->state = ST_PROCEEDING;
        } else if (status < 300) {
            if (c->state == ST_INVITING || c->state == ST_PROCEEDING)
                on_answer(i, msg, now);
            else if (c->state == ST_UP || c->state == ST_BYEING)
                send_ack(i, 1); /* our ACK was lost: the 200 is retransmitted */
        } else {
            header(msg, "To", 't', c->to_hdr, sizeof c->to_hdr);
            if (!first_warning[0] && header(msg, "Warning", 0, first_warning, sizeof first_warning))
                for (char *q = first_warning; *q; q++)
                    if (*q == '"' || *q == '\\' || (unsigned char)*q < 0x20)
                        *q = '\'';
            send_ack(i, 0);
            if (c->state == ST_INVITING || c->state == ST_PROCEEDING) {
                fail(c, "rejected %d", status);
                c->state = ST_REJECTED;
            }
        }
    } else if (strstr(cseq, "BYE") && status >= 200 && c->state == ST_BYEING) {
        if (status >= 300)
            fail(c, "BYE answered %d", status);
        c->state = ST_DONE;
    }
}

/* Complete messages at the front of tls_in to on_sip, by Content-Length (RFC 3261
   §18.3); CRLFs between messages (keep-alives, RFC 5626 §3.5.1) are skipped. */
static void tls_frame(int64_t now) {
    static char msg[SIP_MAX_BYTES + 1];
    size_t off = 0;
    while (!sip_connection_error[0]) {
        while (tls_in.n - off >= 2 && tls_in.p[off] == '\r' && tls_in.p[off + 1] == '\n')
            off += 2;
        const char *start = tls_in.p + off;
        const char *end = memmem(start, tls_in.n - off, "\r\n\r\n", 4);
        if (!end) {
            if (tls_in.n - off > SIP_MAX_BYTES)
                tls_close("header section too large");
            break;
        }
        size_t head = (size_t)(end - start) + 4;
        char length[32];
        if (head > SIP_MAX_BYTES) {
            tls_close("header section too large");
            break;
        }
        memcpy(msg, start, head);
        msg[head] = '\0';
        if (!header(msg, "Content-Length", 'l', length, sizeof length)) {
            tls_close("message without Content-Length");
            break;
        }
        size_t total = head + strtoul(length, NULL, 10);
        if (total > SIP_MAX_BYTES) {
            tls_close("message too large");
            break;
        }
        if (tls_in.n - off < total)
            break;
        memcpy(msg, start, total);
        msg[total] = '\0';
        off += total;
        on_sip(msg, now);
    }
    memmove(tls_in.p, tls_in.p + off, tls_in.n - off);
    tls_in.n -= off;
}

/* the SIP connection is readable or writable: read and frame all there is, write what
   is queued (either may want the other direction) */
static void tls_event(void) {
    tls_want_write = 0;
    while (!sip_connection_error[0]) {
        reserve(&tls_in, tls_in.n + TLS_READ_BYTES);
        int r = tls ? SSL_read(tls, tls_in.p + tls_in.n, TLS_READ_BYTES)
                    : (int)recv(sip_fd, tls_in.p + tls_in.n, TLS_READ_BYTES, MSG_DONTWAIT);
        if (r <= 0) {
            tls_blocked(r, 0);
            break;
        }
        tls_in.n += (size_t)r;
        tls_frame(mono());
    }
    tls_flush();
}

/* --- RTP --- */

static void send_frame(struct call *c, int64_t due) {
    _Alignas(8) uint8_t pkt[RTP_HEADER_BYTES + FRAME_BYTES + SRTP_MAX_TRAILER_LEN];
    int pkt_len = RTP_HEADER_BYTES + FRAME_BYTES;
    uint32_t n = c->nsent;
    uint32_t frame = c->frame0 + n;
    uint16_t seq = (uint16_t)(c->seq0 + n);
    uint32_t ts = n * FRAME_BYTES;
    pkt[0] = 0x80;
    pkt[1] = (uint8_t)(PT_PCMU | (n == 0 ? 0x80 : 0));
    pkt[2] = (uint8_t)(seq >> 8);
    pkt[3] = (uint8_t)seq;
    pkt[4] = (uint8_t)(ts >> 24);
    pkt[5] = (uint8_t)(ts >> 16);
    pkt[6] = (uint8_t)(ts >> 8);
    pkt[7] = (uint8_t)ts;
    pkt[8] = (uint8_t)(c->ssrc >> 24);
    pkt[9] = (uint8_t)(c->ssrc >> 16);
    pkt[10] = (uint8_t)(c->ssrc >> 8);
    pkt[11] = (uint8_t)c->ssrc;
    memcpy(pkt + RTP_HEADER_BYTES, stream + frame_offset(frame), FRAME_BYTES);
    int64_t before = mono();
    if (opt_srtp && srtp_protect(c->srtp_tx, pkt, &pkt_len) != srtp_err_status_ok) {
        srtp_errors++;
        tx_errors++;
    } else if (send(c->fd, pkt, (size_t)pkt_len, 0) < 0) {
        tx_errors++;
    } else {
        tx_packets++;
    }
    c->ring[frame % RING_FRAMES].frame = frame;
    c->ring[frame % RING_FRAMES].real_ns = before + mono_to_real;
    c->nsent = n + 1;
    if (before >= window_start && before < window_end)
        push(&late, (double)(before - due) / 1000.0);
}

/* one datagram and its kernel receive time (CLOCK_REALTIME ns, 0 if none) */
static ssize_t recv_stamped(int fd, void *buf, size_t cap, int64_t *rx) {
    char ctrl[CMSG_SPACE(sizeof(struct timespec))];
    struct iovec iov = {buf, cap};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctrl;
    mh.msg_controllen = sizeof ctrl;
    ssize_t len = recvmsg(fd, &mh, MSG_DONTWAIT);
    *rx = 0;
    if (len < 0)
        return len;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof ts);
            *rx = ts.tv_sec * NS_PER_S + ts.tv_nsec;
        }
    return len;
}

static void on_rtp(struct call *c) {
    _Alignas(8) uint8_t buf[2048];
    int64_t rx;
    ssize_t len = recv_stamped(c->fd, buf, sizeof buf, &rx);
    if (len < 0)
        return;
    if (opt_srtp) {
        int plain_len = (int)len;
        if (!c->srtp_rx) { /* before the answer was read */
            rx_foreign++;
            return;
        }
        if (srtp_unprotect(c->srtp_rx, buf, &plain_len) != srtp_err_status_ok) {
            srtp_errors++;
            return;
        }
        len = plain_len;
    }
    if (len < RTP_HEADER_BYTES || (buf[0] >> 6) != 2 || (buf[1] & 0x7F) != PT_PCMU || !rx) {
        rx_foreign++;
        return;
    }
    c->rx_total++;
    if (rx < ws_real || rx > we_real)
        return;
    size_t off = RTP_HEADER_BYTES + 4u * (buf[0] & 0x0F);
    if ((buf[0] & 0x10) && (size_t)len >= off + 4)
        off += 4 + 4u * ((size_t)buf[off + 2] << 8 | buf[off + 3]);
    uint16_t seq = (uint16_t)(buf[2] << 8 | buf[3]);
    if (c->last_rx_win_ns)
        push(&gaps, (double)(rx - c->last_rx_win_ns) / 1000.0);
    c->last_rx_win_ns = rx;
    if (!c->have_seq) {
        c->have_seq = 1;
        c->ext_seq = c->min_ext = c->max_ext = seq;
    } else {
        c->ext_seq += (int16_t)(seq - c->last_seq);
        if (c->ext_seq < c->min_ext)
            c->min_ext = c->ext_seq;
        if (c->ext_seq > c->max_ext)
            c->max_ext = c->ext_seq;
    }
    c->last_seq = seq;
    c->rx_win++;
    if (off > (size_t)len || (size_t)len - off != FRAME_BYTES) {
        c->unmatched++;
        return;
    }
    int64_t k = lookup_frame(buf + off);
    if (k == -2) {
        c->ambiguous++;
        return;
    }
    if (k < 0 || c->nsent == 0) {
        c->unmatched++;
        return;
    }
    int64_t last = (int64_t)c->frame0 + c->nsent - 1;
    int64_t back = ((last - k) % clip_len + clip_len) % clip_len;
    int64_t frame = last - back;
    struct sent_frame *s = &c->ring[frame % RING_FRAMES];
    if (frame < c->frame0 || s->frame != (uint32_t)frame || rx < s->real_ns) {
        c->stale++;
        return;
    }
    double us = (double)(rx - s->real_ns) / 1000.0;
    push(&echo, us);
    if (rx < first5_real)
        push(&echo_first5, us);
    if (rx >= last5_real)
        push(&echo_last5, us);
}

/* --- setup and loop --- */

static void usage(void) {
    fprintf(stderr,
            "usage: rtpload --sip-port P --rtp-base B --clip FILE [--calls N] [--rate CPS]\n"
            "               [--duration S] [--settle S] [--tick-us US] [--aligned]\n"
            "               [--transport udp|tcp|tls] [--tls-ca FILE] [--srtp]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a];
        if (!strcmp(k, "--aligned")) {
            opt_aligned = 1;
            continue;
        }
        if (!strcmp(k, "--srtp")) {
            opt_srtp = 1;
            continue;
        }
        if (a + 1 >= argc)
            usage();
        const char *v = argv[++a];
        if (!strcmp(k, "--calls"))
            opt_calls = atoi(v);
        else if (!strcmp(k, "--sip-port"))
            opt_sip_port = atoi(v);
        else if (!strcmp(k, "--rtp-base"))
            opt_rtp_base = atoi(v);
        else if (!strcmp(k, "--clip"))
            opt_clip = v;
        else if (!strcmp(k, "--rate"))
            opt_rate = atof(v);
        else if (!strcmp(k, "--duration"))
            opt_duration = atof(v);
        else if (!strcmp(k, "--settle"))
            opt_settle = atof(v);
        else if (!strcmp(k, "--tick-us"))
            opt_tick_us = atoi(v);
        else if (!strcmp(k, "--transport") &&
                 (!strcmp(v, "udp") || !strcmp(v, "tcp") || !strcmp(v, "tls"))) {
            opt_stream = strcmp(v, "udp") != 0;
            opt_tls = !strcmp(v, "tls");
        }
        else if (!strcmp(k, "--tls-ca"))
            opt_tls_ca = v;
        else
            usage();
    }
    if (opt_calls < 1 || !opt_sip_port || !opt_rtp_base || !opt_clip || opt_rate <= 0 ||
        opt_duration < 10 || opt_tick_us < 1 || opt_rtp_base + 2 * opt_calls > 65535)
        usage(); /* the drift compares the first and last 5 s: 10 s at least */
}

static void add_fd(int fd, uint32_t id) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
    if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

/* one TCP connection to the daemon, over TLS its handshake done (blocking), then
   non-blocking */
static void tls_connect(void) {
    sip_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (sip_fd < 0)
        die("socket sip");
    if (!opt_tls) {
        if (connect(sip_fd, (struct sockaddr *)&daemon_sip, sizeof daemon_sip) < 0)
            die("connect sip");
        int on = 1;
        setsockopt(sip_fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        if (fcntl(sip_fd, F_SETFL, fcntl(sip_fd, F_GETFL) | O_NONBLOCK) < 0)
            die("fcntl");
        return;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        die("tls setup");
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_verify(ctx, opt_tls_ca ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (opt_tls_ca && SSL_CTX_load_verify_locations(ctx, opt_tls_ca, NULL) != 1) {
        ERR_print_errors_fp(stderr);
        exit(1);
    }
    if (connect(sip_fd, (struct sockaddr *)&daemon_sip, sizeof daemon_sip) < 0)
        die("connect sip");
    int on = 1;
    setsockopt(sip_fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    tls = SSL_new(ctx);
    if (!tls || SSL_set_fd(tls, sip_fd) != 1 ||
        (opt_tls_ca && X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(tls), "127.0.0.1") != 1) ||
        SSL_connect(tls) != 1) {
        fprintf(stderr, "rtpload: TLS handshake with 127.0.0.1:%d failed\n", opt_sip_port);
        ERR_print_errors_fp(stderr);
        exit(1);
    }
    if (fcntl(sip_fd, F_SETFL, fcntl(sip_fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl");
}

static void setup(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    snprintf(run_id, sizeof run_id, "rl%ld", (long)getpid());
    ep_fd = epoll_create1(0);
    if (ep_fd < 0)
        die("epoll_create1");
    daemon_sip = (struct sockaddr_in){.sin_family = AF_INET,
                                      .sin_port = htons((uint16_t)opt_sip_port),
                                      .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int on = 1;
    if (opt_stream) {
        tls_connect();
    } else {
        sip_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (sip_fd < 0)
            die("socket sip");
        if (bind(sip_fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("bind sip");
        int big = 4 << 20;
        setsockopt(sip_fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        setsockopt(sip_fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
    }
    socklen_t al = sizeof a;
    getsockname(sip_fd, (struct sockaddr *)&a, &al);
    sip_local_port = ntohs(a.sin_port);
    add_fd(sip_fd, ID_SIP);
    if (opt_srtp)
        srtp_setup();
    calls = calloc((size_t)opt_calls, sizeof *calls);
    if (!calls)
        die("calloc");
    for (int i = 0; i < opt_calls; i++) {
        struct call *c = &calls[i];
        c->port = opt_rtp_base + 2 * i;
        c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (c->fd < 0)
            die("socket rtp");
        setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
        a.sin_port = htons((uint16_t)c->port);
        if (bind(c->fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("bind rtp");
        add_fd(c->fd, (uint32_t)i);
        c->frame0 = (uint32_t)(((uint64_t)i * 7919u) % clip_len); /* calls start in different places */
        c->seq0 = (uint16_t)(i * 2654435761u >> 16);
        c->ssrc = 0x10000000u + (uint32_t)i;
        if (opt_srtp) {
            uint8_t key_salt[KEY_SALT_BYTES];
            if (getrandom(key_salt, sizeof key_salt, 0) != (ssize_t)sizeof key_salt)
                die("getrandom");
            EVP_EncodeBlock((unsigned char *)c->key_b64, key_salt, KEY_SALT_BYTES);
            c->srtp_tx = srtp_session(key_salt, ssrc_any_outbound);
        }
    }
}

static void emit_event(const char *name, int64_t cpu0) {
    printf("{\"event\":\"%s\",\"wall_s\":%.6f,\"cpu_s\":%.6f}\n", name,
           (double)clock_ns(CLOCK_REALTIME) / 1e9, (double)(cpu_ns() - cpu0) / 1e9);
    fflush(stdout);
}

static void print_num(const char *key, double v, int comma) {
    if (isnan(v) || isinf(v))
        printf("\"%s\":null", key);
    else
        printf("\"%s\":%.3f", key, v);
    if (comma)
        putchar(',');
}

static void print_result(double gen_cpu_window_s, double gen_cpu_total_s) {
    struct series *all[] = {&gaps, &echo, &echo_first5, &echo_last5, &late, &answer};
    for (size_t s = 0; s < sizeof all / sizeof *all; s++)
        qsort(all[s]->v, all[s]->n, sizeof(float), cmp_float);
    uint64_t expected = 0, received = 0, unmatched = 0, ambiguous = 0, stale = 0, ok = 0;
    uint64_t answered = 0;
    for (int i = 0; i < opt_calls; i++) {
        struct call *c = &calls[i];
        if (c->have_seq) {
            expected += (uint64_t)(c->max_ext - c->min_ext + 1);
            received += c->rx_win;
        }
        unmatched += c->unmatched;
        ambiguous += c->ambiguous;
        stale += c->stale;
        ok += !c->fail[0];
        answered += c->answered_ns != 0;
    }
    uint64_t lost = expected > received ? expected - received : 0;
    double window_s = (double)(window_end - window_start) / 1e9;
    printf("{\"event\":\"result\",\"calls\":%d,\"calls_ok\":%llu,\"calls_answered\":%llu,"
           "\"aligned\":%s,\"transport\":\"%s\",\"srtp\":%s,\"srtp_errors\":%llu,"
           "\"sip_connection_error\":\"%s\",",
           opt_calls, (unsigned long long)ok, (unsigned long long)answered,
           opt_aligned ? "true" : "false", opt_tls ? "tls" : opt_stream ? "tcp" : "udp", opt_srtp ? "true" : "false",
           (unsigned long long)srtp_errors, sip_connection_error);
    print_num("window_s", window_s, 1);
    printf("\"invite_responses\":{");
    int first = 1;
    for (int s = 100; s < 700; s++)
        if (status_counts[s]) {
            printf("%s\"%d\":%d", first ? "" : ",", s, status_counts[s]);
            first = 0;
        }
    printf("},\"refusal_warning\":\"%s\",\"failures\":{", first_warning);
    /* reasons counted (few distinct ones; quadratic is fine) */
    first = 1;
    for (int i = 0; i < opt_calls; i++) {
        if (!calls[i].fail[0])
            continue;
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = !strcmp(calls[j].fail, calls[i].fail);
        if (seen)
            continue;
        int n = 0;
        for (int j = i; j < opt_calls; j++)
            n += !strcmp(calls[j].fail, calls[i].fail);
        printf("%s\"%s\":%d", first ? "" : ",", calls[i].fail, n);
        first = 0;
    }
    printf("},\"failed_calls\":[");
    first = 1;
    for (int i = 0; i < opt_calls; i++)
        if (calls[i].fail[0]) {
            printf("%s[%d,\"%s\"]", first ? "" : ",", i, calls[i].fail);
            first = 0;
        }
    printf("],");
    print_num("invite_200_p50_ms", pct_ms(&answer, 50), 1);
    print_num("invite_200_p99_ms", pct_ms(&answer, 99), 1);
    print_num("invite_200_max_ms", pct_ms(&answer, 100), 1);
    printf("\"gap_count\":%zu,", gaps.n);
    print_num("gap_p50_ms", pct_ms(&gaps, 50), 1);
    print_num("gap_p99_ms", pct_ms(&gaps, 99), 1);
    print_num("gap_max_ms", pct_ms(&gaps, 100), 1);
    printf("\"rx_packets\":%llu,\"rx_expected\":%llu,", (unsigned long long)received,
           (unsigned long long)expected);
    print_num("loss_pct", expected ? 100.0 * (double)lost / (double)expected : NAN, 1);
    printf("\"echo_count\":%zu,\"echo_unmatched\":%llu,\"echo_ambiguous\":%llu,"
           "\"echo_stale\":%llu,",
           echo.n, (unsigned long long)unmatched, (unsigned long long)ambiguous,
           (unsigned long long)stale);
    print_num("echo_p50_ms", pct_ms(&echo, 50), 1);
    print_num("echo_p99_ms", pct_ms(&echo, 99), 1);
    print_num("echo_max_ms", pct_ms(&echo, 100), 1);
    print_num("echo_first5_p50_ms", pct_ms(&echo_first5, 50), 1);
    print_num("echo_last5_p50_ms", pct_ms(&echo_last5, 50), 1);
    print_num("echo_drift_ms", pct_ms(&echo_last5, 50) - pct_ms(&echo_first5, 50), 1);
    printf("\"tx_packets\":%llu,\"tx_errors\":%llu,\"rx_foreign\":%llu,\"sip_rx\":%llu,"
           "\"sip_unparsed\":%llu,",
           (unsigned long long)tx_packets, (unsigned long long)tx_errors,
           (unsigned long long)rx_foreign, (unsigned long long)sip_rx,
           (unsigned long long)sip_unparsed);
    print_num("send_late_p50_ms", pct_ms(&late, 50), 1);
    print_num("send_late_p99_ms", pct_ms(&late, 99), 1);
    print_num("send_late_max_ms", pct_ms(&late, 100), 1);
    print_num("gen_cpu_window_s", gen_cpu_window_s, 1);
    print_num("gen_cpu_pct", 100.0 * gen_cpu_window_s / window_s, 1);
    print_num("gen_cpu_total_s", gen_cpu_total_s, 0);
    printf("}\n");
    fflush(stdout);
}

/* at the end of the window: every call up received media all through it */
static void check_media(void) {
    for (int i = 0; i < opt_calls; i++) {
        struct call *c = &calls[i];
        if (c->state != ST_UP)
            continue;
        if (!c->rx_win)
            fail(c, "no media in the window");
        else if (c->last_rx_win_ns < we_real - MEDIA_STOPPED_NS)
            fail(c, "media stopped before the window ended");
    }
}

static int cursor;     /* the next call to send, in phase order */
static int64_t period; /* the 20 ms period it sends in */

static int64_t next_due(void) {
    int64_t phase = opt_aligned ? 0 : (int64_t)cursor * PERIOD_NS / opt_calls;
    return t0 + period * PERIOD_NS + phase;
}

/* send every frame due by now (a call not up skips its turn); returns the time */
static int64_t send_due(int64_t now) {
    if (now >= send_stop)
        return now;
    for (int64_t due; (due = next_due()) <= now;) {
        struct call *c = &calls[cursor];
        if (c->sending && c->state == ST_UP)
            send_frame(c, due);
        if (++cursor == opt_calls) {
            cursor = 0;
            period++;
        }
        now = mono();
    }
    return now;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    load_clip();
    setup();
    int64_t cpu0 = cpu_ns();
    int64_t r0 = clock_ns(CLOCK_REALTIME), m0 = mono(), r1 = clock_ns(CLOCK_REALTIME);
    mono_to_real = (r0 + r1) / 2 - m0;
    t0 = m0 + 50000000LL; /* first INVITE in 50 ms */
    int64_t ns_per_call = (int64_t)(1e9 / opt_rate);
    window_start = t0 + (int64_t)(opt_calls - 1) * ns_per_call + (int64_t)(opt_settle * 1e9);
    window_end = window_start + (int64_t)(opt_duration * 1e9);
    send_stop = window_end + TAIL_NS;
    finish_by = send_stop + (int64_t)opt_calls * BYE_SPACING_NS + BYE_TIMEOUT_NS + NS_PER_S;
    ws_real = window_start + mono_to_real;
    we_real = window_end + mono_to_real;
    first5_real = ws_real + 5 * NS_PER_S;
    last5_real = we_real - 5 * NS_PER_S;
    int64_t grid = (int64_t)opt_tick_us * 1000;
    int next_invite = 0, next_bye = 0;
    int64_t next_scan = t0, cpu_ws = 0, cpu_we = 0;
    int said_start = 0, said_mid = 0, said_end = 0;
    struct epoll_event evs[MAX_EVENTS];
    char sip_buf[SIP_MAX_BYTES + 1];

    for (;;) {
        int64_t now = mono();
        while (next_invite < opt_calls && t0 + next_invite * ns_per_call <= now) {
            struct call *c = &calls[next_invite];
            c->state = ST_INVITING;
            c->invite_ns = c->last_tx_ns = now;
            c->retx_ns = first_retransmit_ns();
            send_invite(next_invite++);
        }
        now = send_due(now);
        if (!said_start && now >= window_start) {
            said_start = 1;
            cpu_ws = cpu_ns();
            emit_event("window_start", cpu0);
        }
        if (!said_mid && now >= window_start + (window_end - window_start) / 2) {
            said_mid = 1;
            emit_event("window_mid", cpu0);
        }
        if (!said_end && now >= window_end) {
            said_end = 1;
            cpu_we = cpu_ns();
            emit_event("window_end", cpu0);
        }
        if (now >= send_stop && next_bye == 0)
            check_media();
        while (now >= send_stop && next_bye < opt_calls &&
               send_stop + next_bye * BYE_SPACING_NS <= now) {
            struct call *c = &calls[next_bye];
            c->sending = 0;
            if (c->state == ST_UP) {
                c->state = ST_BYEING;
                c->bye_ns = c->last_tx_ns = now;
                c->retx_ns = first_retransmit_ns();
                send_bye(next_bye);
            } else if (c->state == ST_INVITING || c->state == ST_PROCEEDING) {
                fail(c, "no final answer to INVITE");
                c->state = ST_DONE;
            }
            next_bye++;
        }
        if (now >= next_scan) {
            int pending = 0;
            for (int i = 0; i < opt_calls; i++) {
                struct call *c = &calls[i];
                if (c->state == ST_INVITING || c->state == ST_BYEING) {
                    int64_t start = c->state == ST_INVITING ? c->invite_ns : c->bye_ns;
                    int64_t limit = c->state == ST_INVITING ? INVITE_TIMEOUT_NS : BYE_TIMEOUT_NS;
                    if (now - start >= limit) {
                        fail(c, c->state == ST_INVITING ? "INVITE timed out" : "BYE timed out");
                        c->state = c->state == ST_INVITING ? ST_REJECTED : ST_DONE;
                    } else if (now - c->last_tx_ns >= c->retx_ns) {
                        c->last_tx_ns = now;
                        c->retx_ns *= 2;
                        if (c->state == ST_INVITING)
                            send_invite(i);
                        else
                            send_bye(i);
                    }
                }
                pending += c->state == ST_BYEING;
            }
            next_scan = now + SCAN_NS;
            if (next_bye == opt_calls && (!pending || now >= finish_by))
                break;
        }
        /* the next thing due, rounded up onto the grid */
        int64_t wake = next_scan;
        if (next_invite < opt_calls && t0 + next_invite * ns_per_call < wake)
            wake = t0 + next_invite * ns_per_call;
        if (now < send_stop) {
            int64_t d = next_due();
            if (d < wake)
                wake = d;
        }
        int64_t marks[] = {window_start, window_start + (window_end - window_start) / 2, window_end,
                           send_stop};
        for (size_t m = 0; m < sizeof marks / sizeof *marks; m++)
            if (marks[m] > now && marks[m] < wake)
                wake = marks[m];
        if (next_bye < opt_calls && now >= send_stop) {
            int64_t b = send_stop + next_bye * BYE_SPACING_NS;
            if (b < wake)
                wake = b;
        }
        wake = t0 + ((wake - t0 + grid - 1) / grid) * grid;
        if (wake > now + IDLE_NS)
            wake = now + IDLE_NS;
        struct timespec until = {.tv_sec = wake / NS_PER_S, .tv_nsec = wake % NS_PER_S};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR) {
        }
        int n;
        do {
            n = epoll_wait(ep_fd, evs, MAX_EVENTS, 0);
            if (n < 0 && errno != EINTR)
                die("epoll_wait");
            for (int e = 0; e < n; e++) {
                uint32_t id = evs[e].data.u32;
                if (id == ID_SIP && opt_stream) {
                    tls_event();
                } else if (id == ID_SIP) {
                    for (int k = 0; k < 64; k++) {
                        int64_t rx;
                        ssize_t len = recv_stamped(sip_fd, sip_buf, SIP_MAX_BYTES, &rx);
                        if (len <= 0)
                            break;
                        sip_buf[len] = '\0';
                        on_sip(sip_buf, rx ? rx - mono_to_real : mono());
                    }
                } else {
                    on_rtp(&calls[id]);
                }
                if ((e & (SEND_CHECK_EVENTS - 1)) == SEND_CHECK_EVENTS - 1)
                    send_due(mono()); /* a burst of echoes does not delay what is due */
            }
        } while (n == MAX_EVENTS);
    }
    int64_t cpu_end = cpu_ns();
    if (!said_end)
        cpu_we = cpu_end;
    print_result((double)(cpu_we - cpu_ws) / 1e9, (double)(cpu_end - cpu0) / 1e9);
    return 0;
}
