/*
 * Zero-copy sending of file ranges to a TCP socket (sendfile(2)), for exports:
 * Node's only way is to read the file into a buffer and write that to the
 * socket, two copies through user space, which keeps a whole-disk GET below a
 * sendfile server such as nginx.
 *
 * sendSpans(sockFd, fileFds, spans, onProgress, onDone[, buffers]) -> job
 *   spans: [fdIndex, position, length, ...] (an array or a Float64Array);
 *   fdIndex -1 sends `length` zeros (holes of a sparse disk are never read
 *   from storage, as in the stream path). A file that ends before a span does
 *   sends zeros for the rest, as a read past the end of a raw image reads zeros.
 *   fdIndex -2 - i sends `length` bytes of buffers[i] (an ArrayBuffer or a
 *   typed array) from `position`: the bytes a vhd or qcow2 export makes itself
 *   (footers, headers, tables, the sector bitmap before every VHD block), sent
 *   in order between the disk's file spans by the same thread.
 * cancelSend(job): stops the job at its next step (within one sendfile call).
 *
 * Why buffer spans in the job rather than a memfd or one job per piece: a
 * VHD export has a 512-byte bitmap before every 2 MiB block, and a qcow2
 * export's metadata is made per request; one job per piece would start a
 * thread and cross to the event loop twice per block, and a memfd would
 * cost a write of bytes Node already holds. Here a whole run of blocks (the
 * caller sends a few thousand spans per job) is one call, the buffers are
 * read where they are, kept alive by references until onDone, and a small
 * buffer followed by more spans goes with MSG_MORE so it leaves in the same
 * segment as the file bytes after it. The buffers must not change while the
 * job runs (the caller hands it bytes it never writes again).
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
  const char *data;
  size_t length;
} bytes_t;

typedef struct {
  int sock;
  int *fds;
  size_t nfds;
  bytes_t *buffers;     /* where the buffer spans' bytes are (kept alive by buffer_refs) */
  napi_ref *buffer_refs;
  size_t nbuffers;
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

/* Lets go of the buffers (event loop only: references belong to the env). */
static void release_buffers(napi_env env, job_t *job) {
  for (size_t i = 0; i < job->nbuffers; i++)
    if (job->buffer_refs[i]) napi_delete_reference(env, job->buffer_refs[i]);
  job->nbuffers = 0;
}

static void unref_job(job_t *job) {
  if (--job->refs > 0) return;
  if (job->cancel_fd >= 0) close(job->cancel_fd);
  free(job->buffers);
  free(job->buffer_refs);
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

/* Sends `length` bytes from memory (a buffer, or zeros repeated when `data` is NULL); returns 0 or an errno.
 * `more` (a buffer span with spans after it: a VHD bitmap before its block): the kernel may hold a short
 * tail back to fill a segment with what comes next. */
static int send_memory(job_t *job, const char *data, int64_t length, int more) {
  while (length > 0) {
    if (atomic_load(&job->cancelled)) return ECANCELED;
    size_t want = length < ZERO_BYTES || data ? (size_t)length : ZERO_BYTES;
    if (want > STEP_BYTES) want = STEP_BYTES;
    ssize_t n = send(job->sock, data ? data : zeros, want, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (n > 0) {
      length -= n;
      if (data) data += n;
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
      return send_memory(job, NULL, length, 0);
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
    int more = i + 1 < job->nspans;
    if (s->fd_index >= 0)
      err = send_file(job, job->fds[s->fd_index], s->position, s->length);
    else if (s->fd_index == -1)
      err = send_memory(job, NULL, s->length, 0);
    else
      err = send_memory(job, job->buffers[-2 - s->fd_index].data + s->position, s->length, more);
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
  /* The thread is done with the buffers. */
  if (env != NULL) release_buffers(env, job);
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

/* The bytes of an ArrayBuffer or a typed array (a Buffer); 0 when it is neither. */
static int get_bytes(napi_env env, napi_value value, bytes_t *out) {
  bool is = false;
  void *data = NULL;
  size_t length = 0;
  if (napi_is_arraybuffer(env, value, &is) == napi_ok && is) {
    if (napi_get_arraybuffer_info(env, value, &data, &length) != napi_ok) return 0;
  } else if (napi_is_typedarray(env, value, &is) == napi_ok && is) {
    napi_typedarray_type type;
    size_t elements, offset;
    napi_value ab;
    if (napi_get_typedarray_info(env, value, &type, &elements, &data, &ab, &offset) != napi_ok) return 0;
    size_t width = type == napi_uint8_array || type == napi_int8_array || type == napi_uint8_clamped_array ? 1
                   : type == napi_int16_array || type == napi_uint16_array                              ? 2
                   : type == napi_float64_array || type == napi_bigint64_array ||
                           type == napi_biguint64_array
                       ? 8
                       : 4;
    length = elements * width;
  } else {
    return 0;
  }
  out->data = data;
  out->length = length;
  return 1;
}

static napi_value send_spans(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t sock;
  uint32_t nfds = 0, nvalues = 0, nbuffers = 0;
  bool is_array = false, is_typed = false, fds_array = false, buffers_array = false;
  const double *typed = NULL;
  if (argc >= 3) {
    napi_is_array(env, argv[2], &is_array);
    if (!is_array && napi_is_typedarray(env, argv[2], &is_typed) == napi_ok && is_typed) {
      napi_typedarray_type type;
      size_t elements, offset;
      napi_value ab;
      void *data;
      if (napi_get_typedarray_info(env, argv[2], &type, &elements, &data, &ab, &offset) != napi_ok ||
          type != napi_float64_array || elements > UINT32_MAX)
        is_typed = false;
      else {
        typed = data;
        nvalues = (uint32_t)elements;
      }
    }
  }
  if (argc >= 6) {
    napi_valuetype t;
    napi_typeof(env, argv[5], &t);
    if (t != napi_undefined && (napi_is_array(env, argv[5], &buffers_array) != napi_ok || !buffers_array)) {
      napi_throw_type_error(env, NULL, "buffers must be an array of ArrayBuffers or typed arrays");
      return NULL;
    }
  }
  if (argc < 5 || napi_get_value_int32(env, argv[0], &sock) != napi_ok ||
      napi_is_array(env, argv[1], &fds_array) != napi_ok || !fds_array || !(is_array || is_typed)) {
    napi_throw_type_error(env, NULL, "expected (sockFd, fileFds[], spans[], onProgress, onDone, buffers?)");
    return NULL;
  }
  napi_get_array_length(env, argv[1], &nfds);
  if (is_array) napi_get_array_length(env, argv[2], &nvalues);
  if (buffers_array) napi_get_array_length(env, argv[5], &nbuffers);
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
  job->buffers = calloc(nbuffers ? nbuffers : 1, sizeof(bytes_t));
  job->buffer_refs = calloc(nbuffers ? nbuffers : 1, sizeof(napi_ref));
  const char *bad = NULL;
  if (!job->spans || !job->fds || !job->buffers || !job->buffer_refs) bad = "out of memory";
  job->nbuffers = bad ? 0 : nbuffers;
  for (uint32_t i = 0; !bad && i < nbuffers; i++) {
    napi_value b;
    if (napi_get_element(env, argv[5], i, &b) != napi_ok || !get_bytes(env, b, &job->buffers[i]))
      bad = "buffers must be ArrayBuffers or typed arrays";
    else if (napi_create_reference(env, b, 1, &job->buffer_refs[i]) != napi_ok)
      bad = "could not hold a buffer";
  }
  for (size_t i = 0; !bad && i < job->nspans; i++) {
    int64_t idx, pos, len;
    if (typed) {
      double d[3] = {typed[3 * i], typed[3 * i + 1], typed[3 * i + 2]};
      int whole = 1;
      for (int k = 0; k < 3; k++)
        if (!(d[k] >= -9007199254740991.0 && d[k] <= 9007199254740991.0) || d[k] != (double)(int64_t)d[k]) whole = 0;
      if (!whole) {
        bad = "invalid span";
        break;
      }
      idx = (int64_t)d[0], pos = (int64_t)d[1], len = (int64_t)d[2];
    } else if (!get_int64_element(env, argv[2], (uint32_t)(3 * i), &idx) ||
               !get_int64_element(env, argv[2], (uint32_t)(3 * i + 1), &pos) ||
               !get_int64_element(env, argv[2], (uint32_t)(3 * i + 2), &len)) {
      bad = "invalid span";
      break;
    }
    if (idx >= (int64_t)nfds || idx < -2 - (int64_t)nbuffers + 1 || pos < 0 || len < 0)
      bad = "invalid span";
    else if (idx <= -2 && (uint64_t)pos + (uint64_t)len > job->buffers[-2 - idx].length)
      bad = "a span reaches past its buffer";
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
    release_buffers(env, job);
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
  /* 2: buffer spans and Float64Array spans; an addon built before them has no sendSpansVersion. */
  napi_value version;
  napi_create_int32(env, 2, &version);
  napi_property_descriptor props[] = {
      {"sendSpans", NULL, send_spans, NULL, NULL, NULL, napi_default, NULL},
      {"cancelSend", NULL, cancel_send, NULL, NULL, NULL, napi_default, NULL},
      {"sendSpansVersion", NULL, NULL, NULL, NULL, version, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, 3, props);
}
