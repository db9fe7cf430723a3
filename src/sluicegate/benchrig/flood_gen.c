/* flood_gen: a bounded UDP flood for `python -m sluicegate.benchrig.flood`.
 *
 * Compiled at bench time (gcc -O2) into the output folder; never shipped as a binary.
 * pktgen is not built into the bench kernel, so this is the generator.
 *
 *   flood_gen udp    DST PORT COUNT SECONDS SIZE SRC
 *   flood_gen packet DST PORT COUNT SECONDS SIZE SRC IFNAME DST_MAC [SOURCES]
 *
 * udp:    sendmmsg() on a UDP socket bound to SRC: every datagram goes through the sender's
 *         UDP/IP stack (routing, neighbour, qdisc) before the veth.
 * packet: sendmmsg() of prebuilt Ethernet frames on an AF_PACKET socket with
 *         PACKET_QDISC_BYPASS: no stack on the sending side, so more of the core goes to
 *         offering packets. SOURCES > 1 spreads the IPv4 source over SRC, SRC+1, ...
 *         (spoofed: the frames are built here, so any source works).
 *
 * Stops at COUNT packets or SECONDS, whichever comes first; prints one JSON line:
 * {"mode", "sent", "seconds", "pps", "errors"} (errors: sendmmsg calls that failed, e.g.
 * ENOBUFS; their packets are not in "sent").
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 256         /* messages per sendmmsg(): amortises the syscall */
#define MAX_SIZE 1472     /* UDP payload that fits a 1500-byte MTU */
#define MAX_SOURCES 256   /* distinct frames prebuilt in packet mode */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "flood_gen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint16_t ip_checksum(const void *data, size_t len)
{
    const uint16_t *p = data;
    uint32_t sum = 0;
    for (; len > 1; len -= 2)
        sum += *p++;
    if (len)
        sum += *(const uint8_t *)p;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static int parse_mac(const char *text, uint8_t mac[6])
{
    unsigned int b[6];
    if (sscanf(text, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6)
        return -1;
    for (int i = 0; i < 6; i++)
        mac[i] = (uint8_t)b[i];
    return 0;
}

/* One Ethernet + IPv4 + UDP frame from `source` (UDP checksum 0: allowed for IPv4). */
static size_t build_frame(uint8_t *frame, const uint8_t dst_mac[6], const uint8_t src_mac[6],
                          uint32_t source, uint32_t dst, uint16_t port, size_t size)
{
    struct ether_header *eth = (struct ether_header *)frame;
    struct iphdr *ip = (struct iphdr *)(frame + sizeof(*eth));
    struct udphdr *udp = (struct udphdr *)((uint8_t *)ip + sizeof(*ip));
    memcpy(eth->ether_dhost, dst_mac, 6);
    memcpy(eth->ether_shost, src_mac, 6);
    eth->ether_type = htons(ETHERTYPE_IP);
    memset(ip, 0, sizeof(*ip));
    ip->version = 4;
    ip->ihl = 5;
    ip->ttl = 64;
    ip->protocol = IPPROTO_UDP;
    ip->saddr = source;
    ip->daddr = dst;
    ip->tot_len = htons((uint16_t)(sizeof(*ip) + sizeof(*udp) + size));
    ip->check = ip_checksum(ip, sizeof(*ip));
    udp->source = htons(40000);
    udp->dest = htons(port);
    udp->len = htons((uint16_t)(sizeof(*udp) + size));
    udp->check = 0;
    memset((uint8_t *)udp + sizeof(*udp), 'x', size);
    return sizeof(*eth) + sizeof(*ip) + sizeof(*udp) + size;
}

int main(int argc, char **argv)
{
    if (argc < 8) {
        fprintf(stderr, "usage: %s udp|packet DST PORT COUNT SECONDS SIZE SRC "
                        "[IFNAME DST_MAC [SOURCES]]\n", argv[0]);
        return 1;
    }
    const char *mode = argv[1];
    int packet = strcmp(mode, "packet") == 0;
    if (!packet && strcmp(mode, "udp") != 0) {
        fprintf(stderr, "flood_gen: mode must be udp or packet, not %s\n", mode);
        return 1;
    }
    struct in_addr dst, src;
    if (inet_pton(AF_INET, argv[2], &dst) != 1 || inet_pton(AF_INET, argv[7], &src) != 1) {
        fprintf(stderr, "flood_gen: DST and SRC must be IPv4 addresses\n");
        return 1;
    }
    long port = strtol(argv[3], NULL, 10);
    long long count = strtoll(argv[4], NULL, 10);
    double seconds = strtod(argv[5], NULL);
    long size = strtol(argv[6], NULL, 10);
    if (port < 1 || port > 65535 || count < 1 || seconds <= 0 || size < 0 || size > MAX_SIZE) {
        fprintf(stderr, "flood_gen: PORT 1-65535, COUNT >= 1, SECONDS > 0, SIZE 0-%d\n",
                MAX_SIZE);
        return 1;
    }

    static uint8_t frames[MAX_SOURCES][sizeof(struct ether_header) + 28 + MAX_SIZE];
    static uint8_t payload[MAX_SIZE + 1];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr = dst};
    struct sockaddr_ll ll = {0};
    int fd, sources = 1;
    size_t frame_len = 0;
    memset(msgs, 0, sizeof(msgs));

    if (packet) {
        if (argc < 10) {
            fprintf(stderr, "flood_gen: packet mode needs IFNAME and DST_MAC\n");
            return 1;
        }
        if (argc > 10)
            sources = atoi(argv[10]);
        if (sources < 1 || sources > MAX_SOURCES) {
            fprintf(stderr, "flood_gen: SOURCES 1-%d\n", MAX_SOURCES);
            return 1;
        }
        uint8_t dst_mac[6], src_mac[6];
        if (parse_mac(argv[9], dst_mac) != 0) {
            fprintf(stderr, "flood_gen: DST_MAC like 02:00:00:00:00:01\n");
            return 1;
        }
        unsigned int ifindex = if_nametoindex(argv[8]);
        if (!ifindex)
            die(argv[8]);
        char path[128];
        snprintf(path, sizeof(path), "/sys/class/net/%s/address", argv[8]);
        FILE *f = fopen(path, "r");
        char text[32] = "";
        if (!f || !fgets(text, sizeof(text), f) || parse_mac(text, src_mac) != 0)
            die(path);
        fclose(f);
        fd = socket(AF_PACKET, SOCK_RAW, 0);  /* protocol 0: send only, receive nothing */
        if (fd < 0)
            die("socket(AF_PACKET)");
        int one = 1;
        if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
            die("PACKET_QDISC_BYPASS");
        ll.sll_family = AF_PACKET;
        ll.sll_ifindex = (int)ifindex;
        ll.sll_halen = 6;
        memcpy(ll.sll_addr, dst_mac, 6);
        uint32_t base = ntohl(src.s_addr);
        for (int i = 0; i < sources; i++)
            frame_len = build_frame(frames[i], dst_mac, src_mac, htonl(base + (uint32_t)i),
                                    dst.s_addr, (uint16_t)port, (size_t)size);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = frames[i % sources];
            iov[i].iov_len = frame_len;
            msgs[i].msg_hdr.msg_name = &ll;
            msgs[i].msg_hdr.msg_namelen = sizeof(ll);
        }
    } else {
        fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0)
            die("socket(AF_INET)");
        struct sockaddr_in me = {.sin_family = AF_INET, .sin_addr = src};
        if (bind(fd, (struct sockaddr *)&me, sizeof(me)) < 0)
            die("bind SRC");
        /* connect: no per-datagram route lookup or address in the message */
        if (connect(fd, (struct sockaddr *)&to, sizeof(to)) < 0)
            die("connect DST");
        memset(payload, 'x', sizeof(payload));
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = payload;
            iov[i].iov_len = (size_t)size;
        }
    }
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    long long sent = 0, errors = 0;
    double start = now(), deadline = start + seconds, end = start;
    unsigned int loops = 0;
    while (sent < count) {
        long long left = count - sent;
        unsigned int n = left < BATCH ? (unsigned int)left : BATCH;
        int done = sendmmsg(fd, msgs, n, 0);
        if (done < 0) {
            /* ENOBUFS/EAGAIN: the device queue is full; the packets were not offered */
            errors++;
        } else {
            sent += done;
        }
        /* the clock costs a syscall-free vDSO call, but not every batch needs it */
        if ((++loops & 15) == 0 && (end = now()) >= deadline)
            break;
    }
    end = now();
    double elapsed = end - start;
    printf("{\"mode\": \"%s\", \"sent\": %lld, \"seconds\": %.6f, \"pps\": %.1f, "
           "\"errors\": %lld, \"sources\": %d}\n",
           mode, sent, elapsed, elapsed > 0 ? sent / elapsed : 0.0, errors, sources);
    close(fd);
    return 0;
}
