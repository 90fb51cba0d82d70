/*
 * Zero-copy sending of file ranges to a TCP socket (sendfile(2)), for the raw
 * export: Node's only way is to read the file into a buffer and write that to
 * the socket, two copies through user space, which keeps a whole-disk GET
 * below a sendfile server such as nginx.
 *
 * sendSpans(sockFd, fileFds, spans, onProgress, onDone) -> job
 *   spans: [fdIndex, position, length, ...]; fdIndex -1 sends `length` zeros
 *   (holes of a sparse disk are never read from storage, as in the stream path).
 *   A file that ends before a span does sends zeros for the rest, as a read past
 *   the end of a raw image reads zeros.
 * cancelSend(job): stops the job at its next step (within one sendfile call).
 *
 * Each job runs on a thread of its own, never on the event loop and never on
 * libuv's pool: a client that stops reading keeps the job waiting for the
 * socket (backpressure is the socket's buffer), and a pool thread held that
 * way would stall every file operation of the server. The job works on
 * duplicates of the descriptors, so Node closing the socket or the file
 * meanwhile can never make it write to a descriptor number reused by
 * something else. onProgress(sent) comes now and then, and onDone(code,
 * sent) once (code null, or an errno name: EPIPE, ECANCELED, ...), both on the
 * event loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>
#include <node_api.h>

/* A progress call at most every this many bytes (task progress, not flow control). */
#define PROGRESS_BYTES (32 << 20)
/* A wait for the socket longer than this reports progress (a stalled client shows where it is). */
#define STALL_MS 50
/* One sendfile call moves at most this much, so a cancel is seen soon. */
#define STEP_BYTES (8 << 20)
#define ZERO_BYTES (256 << 10)

static const char zeros[ZERO_BYTES];

typedef struct {
  int fd_index;
  int64_t position;
  int64_t length;
} span_t;

typedef struct {
  int sock;
  int *fds;
  size_t nfds;
  span_t *spans;
  size_t nspans;
  int cancel_fd;        /* eventfd: written by cancelSend, polled beside the socket */
  atomic_int cancelled;
  atomic_llong sent;
  atomic_int progress_pending;
  int64_t unreported;   /* bytes sent since the last progress call (the thread's) */
  int error;            /* errno of the failure, 0 when all was sent */
  int finished;         /* onDone has run (event loop only) */
  int refs;             /* the job object and the thread's onDone (event loop only) */
  napi_threadsafe_function progress;
  napi_threadsafe_function done;
} job_t;

static void close_fds(job_t *job) {
  for (size_t i = 0; i < job->nfds; i++)
    if (job->fds[i] >= 0) close(job->fds[i]);
  if (job->sock >= 0) close(job->sock);
  job->sock = -1;
  job->nfds = 0;
}

static void unref_job(job_t *job) {
  if (--job->refs > 0) return;
  if (job->cancel_fd >= 0) close(job->cancel_fd);
  free(job->fds);
  free(job->spans);
  free(job);
}

static void report_progress(job_t *job) {
  job->unreported = 0;
  if (!atomic_exchange(&job->progress_pending, 1))
    napi_call_threadsafe_function(job->progress, NULL, napi_tsfn_nonblocking);
}

/* Waits until the socket takes bytes again; returns 0, or ECANCELED. */
static int wait_writable(job_t *job) {
  struct pollfd pfd[2] = {{job->sock, POLLOUT, 0}, {job->cancel_fd, POLLIN, 0}};
  /* A fast client frees room within microseconds, hundreds of times a second: only a
   * wait longer than STALL_MS (a slow or stalled client) reports what was sent so far,
   * so the event loop is not woken for each of them. */
  int timeout = STALL_MS;
  for (;;) {
    if (atomic_load(&job->cancelled)) return ECANCELED;
    int r = poll(pfd, 2, timeout);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    if (r == 0) {
      if (job->unreported > 0) report_progress(job);
      timeout = -1;
      continue;
    }
    if (pfd[1].revents) return ECANCELED;
    /* POLLOUT, or POLLERR/POLLHUP: the next send reports the socket's error. */
    return 0;
  }
}

static void sent_bytes(job_t *job, int64_t n) {
  atomic_fetch_add(&job->sent, n);
  job->unreported += n;
  if (job->unreported >= PROGRESS_BYTES) report_progress(job);
}

/* Sends `length` zeros; returns 0 or an errno. */
static int send_zeros(job_t *job, int64_t length) {
  while (length > 0) {
    if (atomic_load(&job->cancelled)) return ECANCELED;
    size_t want = length < ZERO_BYTES ? (size_t)length : ZERO_BYTES;
    ssize_t n = send(job->sock, zeros, want, MSG_NOSIGNAL);
    if (n > 0) {
      length -= n;
      sent_bytes(job, n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int err = wait_writable(job);
      if (err) return err;
    } else {
      return n < 0 ? errno : EPIPE;
    }
  }
  return 0;
}

static int send_file(job_t *job, int fd, int64_t position, int64_t length) {
  while (length > 0) {
    if (atomic_load(&job->cancelled)) return ECANCELED;
    off_t off = (off_t)position;
    size_t want = length < STEP_BYTES ? (size_t)length : STEP_BYTES;
    ssize_t n = sendfile(job->sock, fd, &off, want);
    if (n > 0) {
      position += n;
      length -= n;
      sent_bytes(job, n);
    } else if (n == 0) {
      /* The file ends here: the rest reads as zeros. */
      return send_zeros(job, length);
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      int err = wait_writable(job);
      if (err) return err;
    } else {
      return errno;
    }
  }
  return 0;
}

static void *run_job(void *arg) {
  job_t *job = arg;
  int err = 0;
  for (size_t i = 0; i < job->nspans && !err; i++) {
    span_t *s = &job->spans[i];
    err = s->fd_index < 0 ? send_zeros(job, s->length)
                          : send_file(job, job->fds[s->fd_index], s->position, s->length);
  }
  job->error = err;
  /* Closing our duplicates does not close the connection: Node still has its descriptor. */
  close_fds(job);
  napi_call_threadsafe_function(job->done, NULL, napi_tsfn_blocking);
  napi_release_threadsafe_function(job->progress, napi_tsfn_release);
  napi_release_threadsafe_function(job->done, napi_tsfn_release);
  return NULL;
}

static void call_progress(napi_env env, napi_value cb, void *context, void *data) {
  job_t *job = context;
  if (env == NULL || job->finished) return;
  atomic_store(&job->progress_pending, 0);
  napi_value undefined, arg;
  napi_get_undefined(env, &undefined);
  napi_create_double(env, (double)atomic_load(&job->sent), &arg);
  napi_call_function(env, undefined, cb, 1, &arg, NULL);
}

static void call_done(napi_env env, napi_value cb, void *context, void *data) {
  job_t *job = context;
  job->finished = 1;
  /* The thread is past its last poll, and cancelSend no longer writes to it. */
  close(job->cancel_fd);
  job->cancel_fd = -1;
  if (env != NULL) {
    napi_value undefined, argv[2];
    napi_get_undefined(env, &undefined);
    if (job->error) {
      const char *name = job->error == ECANCELED ? "ECANCELED"
                         : job->error == EPIPE   ? "EPIPE"
                         : job->error == ECONNRESET ? "ECONNRESET"
                                                   : strerror(job->error);
      napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &argv[0]);
    } else {
      napi_get_null(env, &argv[0]);
    }
    napi_create_double(env, (double)atomic_load(&job->sent), &argv[1]);
    napi_call_function(env, undefined, cb, 2, argv, NULL);
  }
  unref_job(job);
}

static void finalize_job_object(napi_env env, void *data, void *hint) {
  unref_job((job_t *)data);
}

static int get_int64_element(napi_env env, napi_value array, uint32_t i, int64_t *out) {
  napi_value v;
  return napi_get_element(env, array, i, &v) == napi_ok && napi_get_value_int64(env, v, out) == napi_ok;
}

static napi_value send_spans(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t sock;
  uint32_t nfds = 0, nvalues = 0;
  bool is_array = false, fds_array = false;
  if (argc < 5 || napi_get_value_int32(env, argv[0], &sock) != napi_ok ||
      napi_is_array(env, argv[1], &fds_array) != napi_ok || !fds_array ||
      napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array) {
    napi_throw_type_error(env, NULL, "expected (sockFd, fileFds[], spans[], onProgress, onDone)");
    return NULL;
  }
  napi_get_array_length(env, argv[1], &nfds);
  napi_get_array_length(env, argv[2], &nvalues);
  if (nvalues % 3 != 0) {
    napi_throw_type_error(env, NULL, "spans holds [fdIndex, position, length] triplets");
    return NULL;
  }
  job_t *job = calloc(1, sizeof(job_t));
  if (!job) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  job->sock = -1;
  job->cancel_fd = -1;
  job->refs = 2;
  job->nspans = nvalues / 3;
  job->spans = calloc(job->nspans ? job->nspans : 1, sizeof(span_t));
  job->fds = calloc(nfds ? nfds : 1, sizeof(int));
  const char *bad = NULL;
  if (!job->spans || !job->fds) bad = "out of memory";
  for (size_t i = 0; !bad && i < job->nspans; i++) {
    int64_t idx, pos, len;
    if (!get_int64_element(env, argv[2], (uint32_t)(3 * i), &idx) ||
        !get_int64_element(env, argv[2], (uint32_t)(3 * i + 1), &pos) ||
        !get_int64_element(env, argv[2], (uint32_t)(3 * i + 2), &len) || idx < -1 || idx >= (int64_t)nfds ||
        pos < 0 || len < 0)
      bad = "invalid span";
    else
      job->spans[i] = (span_t){(int)idx, pos, len};
  }
  for (uint32_t i = 0; i < nfds; i++) job->fds[i] = -1;
  job->nfds = nfds;
  for (uint32_t i = 0; !bad && i < nfds; i++) {
    int64_t fd;
    if (!get_int64_element(env, argv[1], i, &fd)) bad = "file descriptors must be numbers";
    else if ((job->fds[i] = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) bad = strerror(errno);
  }
  if (!bad && (job->sock = fcntl(sock, F_DUPFD_CLOEXEC, 0)) < 0) bad = strerror(errno);
  if (!bad && (job->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) bad = strerror(errno);
  napi_value name;
  napi_create_string_utf8(env, "diskport.sendSpans", NAPI_AUTO_LENGTH, &name);
  if (!bad && (napi_create_threadsafe_function(env, argv[3], NULL, name, 0, 1, NULL, NULL, job, call_progress,
                                               &job->progress) != napi_ok))
    bad = "could not create the progress callback";
  if (!bad && (napi_create_threadsafe_function(env, argv[4], NULL, name, 0, 1, NULL, NULL, job, call_done,
                                               &job->done) != napi_ok)) {
    napi_release_threadsafe_function(job->progress, napi_tsfn_abort);
    bad = "could not create the completion callback";
  }
  if (bad) {
    close_fds(job);
    job->refs = 1;
    unref_job(job);
    napi_throw_error(env, "ESENDFILE", bad);
    return NULL;
  }
  napi_value result;
  napi_create_external(env, job, finalize_job_object, NULL, &result);
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int err = pthread_create(&thread, &attr, run_job, job);
  pthread_attr_destroy(&attr);
  if (err != 0) {
    /* No thread: report the failure through onDone, as any other. */
    job->error = err;
    close_fds(job);
    napi_call_threadsafe_function(job->done, NULL, napi_tsfn_blocking);
    napi_release_threadsafe_function(job->progress, napi_tsfn_release);
    napi_release_threadsafe_function(job->done, napi_tsfn_release);
  }
  return result;
}

static napi_value cancel_send(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data = NULL;
  if (argc < 1 || napi_get_value_external(env, argv[0], &data) != napi_ok || !data) {
    napi_throw_type_error(env, NULL, "expected a job from sendSpans");
    return NULL;
  }
  job_t *job = data;
  /* After onDone the eventfd may be closed soon: only a running job is told. */
  if (!job->finished && !atomic_exchange(&job->cancelled, 1)) {
    uint64_t one = 1;
    ssize_t ignored = write(job->cancel_fd, &one, sizeof one);
    (void)ignored;
  }
  return NULL;
}

void register_sendfile(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"sendSpans", NULL, send_spans, NULL, NULL, NULL, napi_default, NULL},
      {"cancelSend", NULL, cancel_send, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 2, props);
}
