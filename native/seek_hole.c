/*
 * lseek(SEEK_DATA / SEEK_HOLE), fallocate(PUNCH_HOLE), posix_fadvise and
 * aligned buffers (for O_DIRECT) for Node.
 *
 * Node's fs has no way to ask the file system where a sparse file's holes are,
 * and no npm package offers it. Without it, every export of a 2 TiB raw disk
 * would have to read 2 TiB of zeros. The two lseek whences are synchronous
 * because both only consult the file system's extent tree (no data I/O) and
 * return in microseconds.
 * punchHole turns a range back into a hole: a resumable upload uses it to
 * make zeros really zero where an earlier, discarded chunk wrote bytes.
 * alignedBuffer gives the memory O_DIRECT writes need (Node's Buffers are
 * only malloc-aligned); see src/storage/direct-writer.ts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>

/* Returns the offset found, or -1 when there is no data/hole at or after
 * `offset` (ENXIO), and throws on any other error. */
static napi_value do_seek(napi_env env, napi_callback_info info, int whence) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2) {
    napi_throw_type_error(env, NULL, "expected (fd, offset)");
    return NULL;
  }
  int32_t fd;
  int64_t offset;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok) {
    napi_throw_type_error(env, NULL, "fd and offset must be numbers");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  napi_value result;
  if (r < 0) {
    if (errno == ENXIO) {
      napi_create_int64(env, -1, &result);
      return result;
    }
    napi_throw_error(env, "ESEEK", strerror(errno));
    return NULL;
  }
  napi_create_int64(env, (int64_t)r, &result);
  return result;
}

static napi_value seek_data(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_DATA);
}

static napi_value seek_hole(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_HOLE);
}

/* punchHole(fd, offset, length) -> true, or false where the file system
 * cannot punch (the caller then writes zeros). */
static napi_value punch_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  int64_t offset, length;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, offset, length)");
    return NULL;
  }
  napi_value result;
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0) {
    napi_get_boolean(env, true, &result);
    return result;
  }
  if (errno == EOPNOTSUPP || errno == ENOSYS) {
    napi_get_boolean(env, false, &result);
    return result;
  }
  napi_throw_error(env, "EPUNCH", strerror(errno));
  return NULL;
}

/* dropCache(fd): posix_fadvise(DONTNEED) over the whole file. An import
 * replaces a VDI's content, so the old generation's cached pages are dead
 * weight that the kernel would otherwise reclaim while the new one lands. */
static napi_value drop_cache(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd)");
    return NULL;
  }
  napi_value result;
  napi_get_boolean(env, posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0, &result);
  return result;
}

static void free_aligned(napi_env env, void *data, void *hint) {
  int64_t ignored;
  napi_adjust_external_memory(env, -(int64_t)(size_t)hint, &ignored);
  free(data);
}

/* alignedBuffer(size, alignment): a Buffer whose memory starts at a multiple
 * of `alignment`, as O_DIRECT I/O requires of its buffers. Node allocates
 * Buffers where malloc does (16-byte aligned at best). */
static napi_value aligned_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t size, alignment;
  if (argc < 2 || napi_get_value_int64(env, argv[0], &size) != napi_ok ||
      napi_get_value_int64(env, argv[1], &alignment) != napi_ok || size <= 0 || alignment <= 0) {
    napi_throw_type_error(env, NULL, "expected (size, alignment), both positive");
    return NULL;
  }
  void *mem = NULL;
  int err = posix_memalign(&mem, (size_t)alignment, (size_t)size);
  if (err != 0) {
    napi_throw_error(env, "EALLOC", strerror(err));
    return NULL;
  }
  napi_value result;
  if (napi_create_external_buffer(env, (size_t)size, mem, free_aligned, (void *)(size_t)size, &result) !=
      napi_ok) {
    free(mem);
    napi_throw_error(env, "EALLOC", "could not wrap the aligned memory in a Buffer");
    return NULL;
  }
  /* Tell V8 the memory is there, so garbage collection frees unused buffers in time. */
  int64_t ignored;
  napi_adjust_external_memory(env, size, &ignored);
  return result;
}

void register_sendfile(napi_env env, napi_value exports); /* sendfile.c */
void register_digests(napi_env env, napi_value exports);  /* digests.c */

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
      {"dropCache", NULL, drop_cache, NULL, NULL, NULL, napi_default, NULL},
      {"alignedBuffer", NULL, aligned_buffer, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 5, props);
  register_sendfile(env, exports);
  register_digests(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
