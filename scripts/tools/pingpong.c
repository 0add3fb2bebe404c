// Request/response over TCP for the shortcut benchmark (scripts/bench_shortcut.py).
//   pingpong serve PORT                         echo server, one thread per connection, on
//                                               TCP PORT and on the abstract Unix socket
//                                               "weft-pingpong-PORT" (the no-TCP reference)
//   pingpong run HOST PORT SIZE SECONDS CONNS   CONNS connections, each sending SIZE
//                                               bytes and waiting for SIZE back, for SECONDS;
//                                               HOST "unix" means the Unix socket
//   pingpong connect HOST PORT SIZE SECONDS CONNS  the same, but a new connection for
//                                               every request (connection setup cost)
//   pingpong upgrade HOST PORT SIZE SECONDS CONNS  as run, each connection first an
//                                               HTTP/1.1 Upgrade answered 101 (a WebSocket's
//                                               start), request/response after it
// Prints one JSON line: requests/s, latency p50/p99 (us), payload MB/s each way.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int full(int fd, char *buf, size_t n, int writing)
{
	size_t done = 0;
	while (done < n) {
		ssize_t k = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
		if (k <= 0)
			return -1;
		done += (size_t)k;
	}
	return 0;
}

static const char upgrade_request[] =
	"GET /pingpong HTTP/1.1\r\nHost: pingpong\r\nConnection: Upgrade\r\nUpgrade: weft-pingpong\r\n\r\n";
static const char upgraded[] = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: weft-pingpong\r\n\r\n";

/* Reads to the end of an HTTP head ("\r\n\r\n"); 0 if it starts with
 * `prefix` (what is already read counts: `seen` bytes of it). */
static int read_head(int fd, const char *prefix, const char *seen)
{
	char head[4096];
	size_t n = strlen(seen);
	memcpy(head, seen, n);
	while (n < 4 || memcmp(head + n - 4, "\r\n\r\n", 4)) {
		if (n == sizeof(head) || read(fd, head + n, 1) != 1)
			return -1;
		n++;
	}
	return strncmp(head, prefix, strlen(prefix)) ? -1 : 0;
}

static void *serve_one(void *arg)
{
	int fd = (int)(intptr_t)arg;
	uint32_t size;
	int ok = full(fd, (char *)&size, 4, 0) == 0;
	if (ok && !memcmp(&size, "GET ", 4)) {
		/* An Upgrade first: answer 101, then the size. */
		ok = read_head(fd, "GET ", "GET ") == 0 && full(fd, (char *)upgraded, strlen(upgraded), 1) == 0 &&
		     full(fd, (char *)&size, 4, 0) == 0;
	}
	if (ok && size > 0 && size <= (64u << 20)) {
		char *buf = malloc(size);
		while (buf && full(fd, buf, size, 0) == 0 && full(fd, buf, size, 1) == 0)
			;
		free(buf);
	}
	close(fd);
	return NULL;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

// Abstract (no file) Unix socket name for PORT; returns the address length.
static socklen_t unix_address(struct sockaddr_un *su, int port)
{
	int n = snprintf(su->sun_path + 1, sizeof(su->sun_path) - 1, "weft-pingpong-%d", port);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

static void *accept_loop(void *arg)
{
	int ls = (int)(intptr_t)arg, one = 1;
	for (;;) {
		int fd = accept(ls, NULL, NULL);
		if (fd < 0) {
			usleep(1000);  /* EMFILE and the like: let threads finish */
			continue;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); // fails harmlessly on Unix sockets
		pthread_t t;
		/* Out of threads for a moment (thousands of short connections a
		 * second): refuse this one rather than leak its descriptor. */
		if (pthread_create(&t, NULL, serve_one, (void *)(intptr_t)fd) != 0) {
			close(fd);
			usleep(1000);
			continue;
		}
		pthread_detach(t);
	}
	return NULL;
}

struct job {
	int fresh;  /* a new connection per request */
	int upgrade;  /* each connection an Upgrade first */
	const char *host;
	int port;
	uint32_t size;
	double seconds;
	double *lat;
	size_t cap, count;
	int failed;
};

static int dial(struct job *j)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(j->port)};
	struct sockaddr_un su = {.sun_family = AF_UNIX};
	socklen_t len = unix_address(&su, j->port);
	int unix_socket = !strcmp(j->host, "unix"), one = 1;
	inet_pton(AF_INET, j->host, &sa.sin_addr);
	int fd = socket(unix_socket ? AF_UNIX : AF_INET, SOCK_STREAM, 0);
	if (!unix_socket)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, unix_socket ? (struct sockaddr *)&su : (struct sockaddr *)&sa, unix_socket ? len : sizeof(sa)) != 0 ||
	    (j->upgrade && (full(fd, (char *)upgrade_request, strlen(upgrade_request), 1) != 0 ||
			    read_head(fd, "HTTP/1.1 101 ", "") != 0)) ||
	    full(fd, (char *)&j->size, 4, 1) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void *run_one(void *arg)
{
	struct job *j = arg;
	int fd = dial(j);
	if (fd < 0) {
		j->failed = 1;
		return NULL;
	}
	char *buf = malloc(j->size);
	memset(buf, 'w', j->size);
	double end = now() + j->seconds;
	while (now() < end) {
		double t0 = now();
		if (j->fresh && j->count > 0) {
			/* An abortive close (RST): thousands of connections a second
			 * would otherwise fill the port range with TIME_WAIT. */
			struct linger l = {.l_onoff = 1, .l_linger = 0};
			setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
			close(fd);
			if ((fd = dial(j)) < 0) {
				j->failed = 1;
				break;
			}
		}
		if (full(fd, buf, j->size, 1) != 0 || full(fd, buf, j->size, 0) != 0) {
			j->failed = 1;
			break;
		}
		if (j->count == j->cap) {
			j->cap = j->cap ? j->cap * 2 : 65536;
			j->lat = realloc(j->lat, j->cap * sizeof(double));
		}
		j->lat[j->count++] = (now() - t0) * 1e6;
	}
	free(buf);
	if (fd >= 0)
		close(fd);
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve")) {
		int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
		setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
		struct sockaddr_un su = {.sun_family = AF_UNIX};
		socklen_t len = unix_address(&su, atoi(argv[2]));
		int us = socket(AF_UNIX, SOCK_STREAM, 0);
		if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) || listen(ls, 1024) ||
		    bind(us, (struct sockaddr *)&su, len) || listen(us, 1024)) {
			perror("listen");
			return 1;
		}
		pthread_t t;
		pthread_create(&t, NULL, accept_loop, (void *)(intptr_t)us);
		accept_loop((void *)(intptr_t)ls);
	}
	if (argc != 7 || (strcmp(argv[1], "run") && strcmp(argv[1], "connect") && strcmp(argv[1], "upgrade"))) {
		fprintf(stderr, "usage: pingpong serve PORT | pingpong run|connect HOST PORT SIZE SECONDS CONNS\n");
		return 2;
	}
	int conns = atoi(argv[6]);
	struct job *jobs = calloc(conns, sizeof(*jobs));
	pthread_t *threads = calloc(conns, sizeof(*threads));
	for (int i = 0; i < conns; i++) {
		jobs[i] = (struct job){.fresh = !strcmp(argv[1], "connect"), .upgrade = !strcmp(argv[1], "upgrade"), .host = argv[2], .port = atoi(argv[3]), .size = (uint32_t)atol(argv[4]), .seconds = atof(argv[5])};
		pthread_create(&threads[i], NULL, run_one, &jobs[i]);
	}
	size_t total = 0;
	int failed = 0;
	for (int i = 0; i < conns; i++) {
		pthread_join(threads[i], NULL);
		total += jobs[i].count;
		failed += jobs[i].failed;
	}
	double *all = malloc((total ? total : 1) * sizeof(double));
	size_t k = 0;
	for (int i = 0; i < conns; i++) {
		memcpy(all + k, jobs[i].lat, jobs[i].count * sizeof(double));
		k += jobs[i].count;
	}
	qsort(all, total, sizeof(double), cmp);
	double secs = atof(argv[5]);
	printf("{\"requests\": %zu, \"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"mbps\": %.2f, \"failed\": %d}\n",
	       total, total / secs, total ? all[total / 2] : 0.0, total ? all[(size_t)(total * 0.99)] : 0.0,
	       total * (double)atol(argv[4]) / secs / 1e6, failed);
	return 0;
}
