/**
 * Comparing secrets (bearer tokens, transfer tokens, xapi session ids) in
 * constant time. At the bottom of the layers: both the HTTP layer and the
 * transfer sessions check secrets.
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';

export function safeEqual(a: string, b: string): boolean {
  return equalsSecret(a, Buffer.from(b));
}

/** `presented` against a secret kept as bytes (compared in constant time, as safeEqual). */
export function equalsSecret(presented: string, secret: Buffer): boolean {
  const p = Buffer.from(presented);
  return p.length === secret.length && timingSafeEqual(p, secret);
}

/**
 * Secrets that must outlive a restart (a push receiver's URL, whose token is
 * the only credential the push needs) are kept in the metadata store sealed
 * with a key derived from the service's own token, which is not in the data
 * directory: whoever reads the data directory (a backup, a copy of the disk)
 * cannot use them. AES-256-GCM; each value has its own salt and nonce.
 */
const SEALED_PREFIX = 'sealed:v1:';
const SALT_BYTES = 16;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

function sealingKey(token: string, salt: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', token, salt, 'diskport sealed secret v1', 32));
}

/** `secret` sealed with `token` (the management token). */
export function sealSecret(secret: string, token: string): string {
  const salt = randomBytes(SALT_BYTES);
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', sealingKey(token, salt), nonce);
  const sealed = Buffer.concat([cipher.update(secret, 'utf8'), cipher.final()]);
  return SEALED_PREFIX + Buffer.concat([salt, nonce, cipher.getAuthTag(), sealed]).toString('base64url');
}

export function isSealed(value: string): boolean {
  return value.startsWith(SEALED_PREFIX);
}

/** The secret in `value`: opened with `token` if sealed, else as it is. Throws if `token` is not the one it was sealed with. */
export function openSecret(value: string, token: string | undefined): string {
  if (!isSealed(value)) return value;
  if (!token) throw new Error('sealed with a token, and the service now runs without one');
  const raw = Buffer.from(value.slice(SEALED_PREFIX.length), 'base64url');
  const salt = raw.subarray(0, SALT_BYTES);
  const nonce = raw.subarray(SALT_BYTES, SALT_BYTES + NONCE_BYTES);
  const tag = raw.subarray(SALT_BYTES + NONCE_BYTES, SALT_BYTES + NONCE_BYTES + TAG_BYTES);
  const decipher = createDecipheriv('aes-256-gcm', sealingKey(token, salt), nonce);
  decipher.setAuthTag(tag);
  try {
    return Buffer.concat([
      decipher.update(raw.subarray(SALT_BYTES + NONCE_BYTES + TAG_BYTES)),
      decipher.final(),
    ]).toString('utf8');
  } catch {
    throw new Error('sealed with another token than the service runs with now');
  }
}
