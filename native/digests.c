/*
 * Block digests hashed on libuv's thread pool, for an import that hashes its
 * blocks as they arrive (src/storage/streamed-digests.ts): on the event loop,
 * SHA-256 was the largest part of an import's CPU, and every byte of it held
 * up the receiving of the next. Here it runs beside the loop, with OpenSSL's
 * SHA-256 (the one Node's crypto uses, SHA extensions included).
 *
 * sha256Blocks(parts, counts, callback): block i is the next counts[i]
 * buffers of `parts`, concatenated; callback(null, entries) gets 16 bytes per
 * block: the first 16 bytes of its SHA-256, or 16 zero bytes for a block of
 * zeros (the entries of block-digests.ts). The buffers are held until then
 * and must not change meanwhile.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <node_api.h>
#include <openssl/evp.h>

#define ENTRY_BYTES 16

typedef struct {
  napi_async_work work;
  napi_ref parts_ref;
  napi_ref callback;
  const uint8_t **data;
  size_t *lengths;
  uint32_t *counts;
  uint32_t nblocks;
  uint8_t *entries;
  int failed;
} hash_job_t;

static int all_zero(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    memcpy(&v, p + i, 8);
    if (v) return 0;
  }
  for (; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

static void execute(napi_env env, void *arg) {
  hash_job_t *job = arg;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  if (!ctx) {
    job->failed = 1;
    return;
  }
  size_t part = 0;
  for (uint32_t b = 0; b < job->nblocks; b++) {
    uint32_t n = job->counts[b];
    int zero = 1;
    for (uint32_t k = 0; k < n && zero; k++) zero = all_zero(job->data[part + k], job->lengths[part + k]);
    uint8_t *entry = job->entries + (size_t)b * ENTRY_BYTES;
    if (zero) {
      memset(entry, 0, ENTRY_BYTES);
    } else {
      unsigned char md[EVP_MAX_MD_SIZE];
      unsigned int mdlen = 0;
      if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) job->failed = 1;
      for (uint32_t k = 0; k < n && !job->failed; k++)
        if (EVP_DigestUpdate(ctx, job->data[part + k], job->lengths[part + k]) != 1) job->failed = 1;
      if (!job->failed && EVP_DigestFinal_ex(ctx, md, &mdlen) != 1) job->failed = 1;
      if (job->failed) break;
      memcpy(entry, md, ENTRY_BYTES);
    }
    part += n;
  }
  EVP_MD_CTX_free(ctx);
}

static void free_job(napi_env env, hash_job_t *job) {
  if (job->parts_ref) napi_delete_reference(env, job->parts_ref);
  if (job->callback) napi_delete_reference(env, job->callback);
  if (job->work) napi_delete_async_work(env, job->work);
  free(job->data);
  free(job->lengths);
  free(job->counts);
  free(job->entries);
  free(job);
}

static void complete(napi_env env, napi_status status, void *arg) {
  hash_job_t *job = arg;
  napi_value cb, undefined, argv[2];
  napi_get_reference_value(env, job->callback, &cb);
  napi_get_undefined(env, &undefined);
  if (status != napi_ok || job->failed) {
    napi_value msg;
    napi_create_string_utf8(env, "hashing the blocks failed", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &argv[0]);
    napi_get_undefined(env, &argv[1]);
  } else {
    napi_get_null(env, &argv[0]);
    void *out;
    napi_create_buffer_copy(env, (size_t)job->nblocks * ENTRY_BYTES, job->entries, &out, &argv[1]);
  }
  free_job(env, job);
  napi_call_function(env, undefined, cb, 2, argv, NULL);
}

static napi_value sha256_blocks(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  bool parts_array = false, counts_array = false;
  napi_valuetype cb_type = napi_undefined;
  if (argc < 3 || napi_is_array(env, argv[0], &parts_array) != napi_ok || !parts_array ||
      napi_is_array(env, argv[1], &counts_array) != napi_ok || !counts_array ||
      napi_typeof(env, argv[2], &cb_type) != napi_ok || cb_type != napi_function) {
    napi_throw_type_error(env, NULL, "expected (parts: Buffer[], counts: number[], callback)");
    return NULL;
  }
  uint32_t nparts, nblocks;
  napi_get_array_length(env, argv[0], &nparts);
  napi_get_array_length(env, argv[1], &nblocks);
  hash_job_t *job = calloc(1, sizeof(hash_job_t));
  if (!job) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  job->nblocks = nblocks;
  job->data = calloc(nparts ? nparts : 1, sizeof(uint8_t *));
  job->lengths = calloc(nparts ? nparts : 1, sizeof(size_t));
  job->counts = calloc(nblocks ? nblocks : 1, sizeof(uint32_t));
  job->entries = calloc(nblocks ? nblocks : 1, ENTRY_BYTES);
  const char *bad = (!job->data || !job->lengths || !job->counts || !job->entries) ? "out of memory" : NULL;
  uint64_t total = 0;
  for (uint32_t b = 0; !bad && b < nblocks; b++) {
    napi_value v;
    uint32_t c = 0;
    if (napi_get_element(env, argv[1], b, &v) != napi_ok || napi_get_value_uint32(env, v, &c) != napi_ok)
      bad = "counts must be numbers";
    job->counts[b] = c;
    total += c;
  }
  if (!bad && total != nparts) bad = "counts must add up to the number of parts";
  for (uint32_t i = 0; !bad && i < nparts; i++) {
    napi_value v;
    void *data = NULL;
    size_t length = 0;
    bool is_buffer = false;
    if (napi_get_element(env, argv[0], i, &v) != napi_ok || napi_is_buffer(env, v, &is_buffer) != napi_ok ||
        !is_buffer || napi_get_buffer_info(env, v, &data, &length) != napi_ok)
      bad = "parts must be Buffers";
    job->data[i] = data;
    job->lengths[i] = length;
  }
  napi_value name;
  napi_create_string_utf8(env, "diskport.sha256Blocks", NAPI_AUTO_LENGTH, &name);
  if (!bad && (napi_create_reference(env, argv[0], 1, &job->parts_ref) != napi_ok ||
               napi_create_reference(env, argv[2], 1, &job->callback) != napi_ok ||
               napi_create_async_work(env, NULL, name, execute, complete, job, &job->work) != napi_ok ||
               napi_queue_async_work(env, job->work) != napi_ok))
    bad = "could not queue the hashing";
  if (bad) {
    free_job(env, job);
    napi_throw_error(env, "EHASH", bad);
  }
  return NULL;
}

void register_digests(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"sha256Blocks", NULL, sha256_blocks, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 1, props);
}
